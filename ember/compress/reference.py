"""The decoder written plainly in numpy, every group of a tensor in step: the oracle the C and
Triton decoders are tested against, and the fallback where no C compiler is available."""

from __future__ import annotations

import numpy as np

from ember.compress.codec import (
    GROUP_LANES,
    GROUP_SYMBOLS,
    PROB_BITS,
    PROB_SCALE,
    RANS_L,
    CorruptStreamError,
    EncodedBF16,
    num_groups,
)


def decode_reference(enc: EncodedBF16) -> np.ndarray:
    """BF16 bits (flat uint16) of `enc`; CorruptStreamError if a group ends in the wrong
    state or off the end of its words."""
    if enc.numel == 0:
        return np.empty(0, dtype=np.uint16)
    freq = enc.freq.astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    symbol_of_slot = np.repeat(np.arange(256), freq)[:PROB_SCALE]
    groups = num_groups(enc.numel)
    first = np.arange(groups, dtype=np.int64)[:, None] * GROUP_SYMBOLS \
        + np.arange(GROUP_LANES)[None, :]  # [groups, lanes]: each lane's first element
    x = enc.states.astype(np.int64).reshape(groups, GROUP_LANES)
    pos = enc.offsets[:-1].astype(np.int64)  # each group's read position
    words = enc.words.astype(np.int64)
    exponents = np.zeros(enc.numel, dtype=np.int64)
    for k in range(-(-min(enc.numel, GROUP_SYMBOLS) // GROUP_LANES)):
        index = first + k * GROUP_LANES
        live = index < enc.numel
        slot = x & (PROB_SCALE - 1)
        sym = symbol_of_slot[slot]
        decoded = freq[sym] * (x >> PROB_BITS) + slot - cum[sym]
        need = live & (decoded < RANS_L)
        # lanes that renormalise take the group's next words in lane order
        read = np.minimum(pos[:, None] + np.cumsum(need, axis=1) - need, words.size - 1)
        decoded = np.where(need, (decoded << 16) | words[read], decoded)
        x = np.where(live, decoded, x)
        pos += need.sum(axis=1)
        exponents[index[live]] = sym[live]
    if np.any(x != RANS_L) or np.any(pos != enc.offsets[1:]):
        raise CorruptStreamError("an exponent stream does not decode to its recorded end state")
    sm = enc.sign_mantissa.astype(np.int64)
    return (((sm & 0x80) << 8) | (exponents << 7) | (sm & 0x7F)).astype(np.uint16)
