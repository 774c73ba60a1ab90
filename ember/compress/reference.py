"""The decoder written plainly in numpy, all lanes of a tensor in step: the oracle the C and
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


def lane_counts(numel: int) -> np.ndarray:
    """How many symbols each lane owns."""
    lanes = np.arange(num_groups(numel) * GROUP_LANES, dtype=np.int64)
    group_n = np.minimum(numel - (lanes // GROUP_LANES) * GROUP_SYMBOLS, GROUP_SYMBOLS)
    j = lanes % GROUP_LANES
    return np.where(group_n > j, (group_n - j + GROUP_LANES - 1) // GROUP_LANES, 0)


def decode_reference(enc: EncodedBF16) -> np.ndarray:
    """BF16 bits (flat uint16) of `enc`; CorruptStreamError if a lane ends in the wrong state."""
    if enc.numel == 0:
        return np.empty(0, dtype=np.uint16)
    freq = enc.freq.astype(np.int64)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    symbol_of_slot = np.repeat(np.arange(256), freq)[:PROB_SCALE]
    counts = lane_counts(enc.numel)
    lanes = np.arange(counts.size, dtype=np.int64)
    first = (lanes // GROUP_LANES) * GROUP_SYMBOLS + lanes % GROUP_LANES
    x = enc.states.astype(np.int64)
    pos = enc.offsets[:-1].astype(np.int64)
    words = enc.words.astype(np.int64)
    exponents = np.empty(enc.numel, dtype=np.int64)
    for k in range(int(counts.max())):
        live = np.flatnonzero(counts > k)
        xs = x[live]
        slot = xs & (PROB_SCALE - 1)
        sym = symbol_of_slot[slot]
        xs = freq[sym] * (xs >> PROB_BITS) + slot - cum[sym]
        need = xs < RANS_L
        read = np.minimum(pos[live], words.size - 1)
        xs = np.where(need, (xs << 16) | words[read], xs)
        pos[live] += need
        x[live] = xs
        exponents[first[live] + k * GROUP_LANES] = sym
    if np.any(x != RANS_L) or np.any(pos != enc.offsets[1:]):
        raise CorruptStreamError("an exponent stream does not decode to its recorded end state")
    sm = enc.sign_mantissa.astype(np.int64)
    return (((sm & 0x80) << 8) | (exponents << 7) | (sm & 0x7F)).astype(np.uint16)
