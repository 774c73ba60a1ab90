"""Decode rANS-coded BF16 weights (codec.py's format) on the GPU: the device copy of an encoded
tensor and the Triton kernel; no encoding, no choice of weights. Importing this imports triton
(for CPU tensors, set TRITON_INTERPRET=1 before the import)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ember.compress.codec import (
    GROUP_LANES,
    GROUP_SYMBOLS,
    LANE_STEPS,
    PROB_BITS,
    PROB_SCALE,
    RANS_L,
    CorruptStreamError,
    EncodedBF16,
    check_encoded,
    num_groups,
)

# NOTE: compiled kernels may read only tl.constexpr globals (the interpreter reads any).
_GROUP_LANES = tl.constexpr(GROUP_LANES)
_GROUP_SYMBOLS = tl.constexpr(GROUP_SYMBOLS)
_LANE_STEPS = tl.constexpr(LANE_STEPS)
_PROB_BITS = tl.constexpr(PROB_BITS)
_SLOT_MASK = tl.constexpr(PROB_SCALE - 1)
_RANS_L = tl.constexpr(RANS_L)

@dataclass(frozen=True)
class DeviceEncoded:
    """An EncodedBF16 on a torch device; uint16/uint32 arrays are kept as int16/int32 views."""

    numel: int
    table: torch.Tensor  # int32 [PROB_SCALE]: slot -> freq | (slot - cum) << 12 | symbol << 24
    offsets: torch.Tensor  # int32 (uint32 bits) [groups + 1]
    states: torch.Tensor  # int32 (uint32 bits) [groups * GROUP_LANES]
    words: torch.Tensor  # int16 (uint16 bits) [offsets[-1] + PADDING_WORDS]
    sign_mantissa: torch.Tensor  # uint8 [numel]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.table, self.offsets, self.states, self.words, self.sign_mantissa))

    @property
    def device(self) -> torch.device:
        return self.words.device


def slot_table(freq: np.ndarray) -> np.ndarray:
    """The decoder's lookup per slot, as rans.c builds it: uint32 [PROB_SCALE]."""
    freq = freq.astype(np.int64)
    if not freq.any():
        return np.zeros(PROB_SCALE, dtype=np.uint32)
    symbol = np.repeat(np.arange(256), freq)[:PROB_SCALE]
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    slot = np.arange(PROB_SCALE)
    return (freq[symbol] | (slot - cum[symbol]) << PROB_BITS | symbol << 24).astype(np.uint32)


def to_device(enc: EncodedBF16, device: torch.device | str) -> DeviceEncoded:
    """Check `enc` (CorruptStreamError if its pieces do not fit) and copy it to `device`."""
    check_encoded(enc)

    def put(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array).view(dtype)).to(device)

    return DeviceEncoded(enc.numel, put(slot_table(enc.freq), np.int32),
                         put(enc.offsets, np.int32), put(enc.states, np.int32),
                         put(enc.words, np.int16), put(enc.sign_mantissa, np.uint8))


@triton.jit
def _rans_decode_kernel(
    words_ptr,  # int16 [num_words]
    offsets_ptr,  # int32 [num_groups + 1]
    states_ptr,  # int32 [num_groups * GROUP_LANES]
    table_ptr,  # int32 [PROB_SCALE]
    sign_mantissa_ptr,  # uint8 [numel]
    out_ptr,  # int16 [numel]
    bad_ptr,  # int8 [num_groups], written only when CHECK
    numel,
    num_groups,
    last_word,
    GROUPS: tl.constexpr,
    CHECK: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = pid * GROUPS + tl.arange(0, GROUPS)  # [G]
    has_group = groups < num_groups
    lane = tl.arange(0, _GROUP_LANES)  # [32]
    x = tl.load(states_ptr + groups[:, None] * _GROUP_LANES + lane[None, :],
                mask=has_group[:, None], other=0).to(tl.uint32, bitcast=True)  # [G, 32]
    pos = tl.load(offsets_ptr + groups[:, None], mask=has_group[:, None], other=0)
    pos = pos.to(tl.uint32, bitcast=True).to(tl.int64)  # [G, 1]: each group's read position
    first = groups.to(tl.int64)[:, None] * _GROUP_SYMBOLS + lane[None, :]  # [G, 32]
    # steps of the program's longest lane: fewer than LANE_STEPS only in the last group
    left = numel - (pid * GROUPS).to(tl.int64) * _GROUP_SYMBOLS
    num_steps = tl.minimum(tl.cdiv(left, _GROUP_LANES), _LANE_STEPS)
    for k in range(0, num_steps):
        idx = first + k * _GROUP_LANES  # [G, 32] int64: the symbol each lane decodes now
        live = idx < numel
        # the 32 words a step may take are read with the other loads, before it is known which
        # lanes need them (clamped into the stream, so corrupt positions stay in bounds)
        sm = tl.load(sign_mantissa_ptr + idx, mask=live, other=0).to(tl.uint32)
        t = tl.load(table_ptr + (x & _SLOT_MASK).to(tl.int32)).to(tl.uint32, bitcast=True)
        ahead = tl.load(words_ptr + tl.minimum(pos + lane[None, :], last_word))
        ahead = ahead.to(tl.uint16, bitcast=True).to(tl.uint32)  # [G, 32]
        # freq * (x >> 12) + (slot - cum) < 4096 * 2^20: no uint32 overflow for any state
        v = (t & _SLOT_MASK) * (x >> _PROB_BITS) + ((t >> _PROB_BITS) & _SLOT_MASK)
        need = (live & (v < _RANS_L)).to(tl.int32)
        # lanes that renormalise take the group's next words in lane order
        # NOTE: tl.cumsum/tl.sum compile to these same builtins; being jit functions, each of
        # their calls re-patches triton.language under the interpreter (~1 ms, half a step)
        taken = tl.associative_scan(need, 1, tl.standard._sum_combine)  # [G, 32] inclusive
        w = tl.gather(ahead, taken - need, axis=1)
        x = tl.where(need != 0, (v << 16) | w, tl.where(live, v, x))
        pos += tl.reduce(need, 1, tl.standard._sum_combine, keep_dims=True)
        bits = ((sm & 0x80) << 8) | ((t >> 24) << 7) | (sm & 0x7F)
        tl.store(out_ptr + idx, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=live)
    if CHECK:
        end = tl.load(offsets_ptr + groups[:, None] + 1, mask=has_group[:, None], other=0)
        end = end.to(tl.uint32, bitcast=True).to(tl.int64)
        bad = tl.max(((x != _RANS_L) | (pos != end)).to(tl.int32), axis=1)  # [G]
        tl.store(bad_ptr + groups, bad.to(tl.int8), mask=has_group)


IS_INTERPRETED: bool = not isinstance(_rans_decode_kernel, JITFunction)
# Groups per program, one warp each: a warp's 32 lanes store 32 neighbouring outputs per step
# and share their group's word stream through warp-local scans and gathers.
# NOTE: decoding is a chain of 2048 dependent steps per lane, so it is latency bound; more groups
# per program does not make a tensor decode faster, it only packs the warps onto fewer SMs: on
# an H100 one group per program decoded 2.2x faster than four (benchmarks/gpu/). Under the
# interpreter four per program keep the CPU tests quick.
GROUPS_PER_PROGRAM = 4 if IS_INTERPRETED else 1


def decode_bf16_triton(enc: DeviceEncoded, out: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Write the BF16 values `enc` encodes into `out` (contiguous bfloat16, enc.numel elements,
    any shape, on enc's device) and return it. check=True syncs with the device and raises
    CorruptStreamError naming the first group that does not end in its recorded state;
    check=False never syncs (corrupt data then give wrong values, never out-of-bounds reads)."""
    if out.dtype != torch.bfloat16 or out.numel() != enc.numel or not out.is_contiguous() \
            or out.device != enc.device:
        raise ValueError(f"out must be {enc.numel} contiguous bfloat16 on {enc.device}, got "
                         f"{out.numel()} {out.dtype} on {out.device} "
                         f"(contiguous={out.is_contiguous()})")
    if enc.numel == 0:
        return out
    groups = num_groups(enc.numel)
    bad = torch.empty(groups if check else 1, dtype=torch.int8, device=enc.device)
    grid = (triton.cdiv(groups, GROUPS_PER_PROGRAM),)
    _rans_decode_kernel[grid](
        enc.words, enc.offsets, enc.states, enc.table, enc.sign_mantissa,
        out.view(-1).view(torch.int16), bad, enc.numel, groups, enc.words.numel() - 1,
        GROUPS=GROUPS_PER_PROGRAM, CHECK=check, num_warps=GROUPS_PER_PROGRAM,
    )
    if check:
        bad_groups = bad.nonzero()  # syncs
        if bad_groups.numel():
            raise CorruptStreamError(f"the exponent stream of group {int(bad_groups[0])} does "
                                     "not decode to its recorded end state (corrupt data)")
    return out
