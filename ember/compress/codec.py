"""Encode and decode the exponent byte of BF16 tensors (interleaved rANS, csrc/rans.c).

A BF16 value is sign (1 bit) | exponent (8) | mantissa (7). The exponent byte is entropy-coded
with one static distribution per tensor; sign and mantissa go into one raw byte
(sign << 7 | mantissa). Decoding writes BF16 bits straight into a caller's buffer, the work
split over threads by groups of lanes (ctypes releases the GIL).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from ember.compress.native import load_rans
from ember.cpu_cores import available_cores

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
GROUP_LANES = 32
LANE_STEPS = 2048
GROUP_SYMBOLS = GROUP_LANES * LANE_STEPS
PADDING_WORDS = 32  # after the streams: a step may read 32 words past a corrupt stream's end


class CorruptStreamError(ValueError):
    """Encoded data that cannot be what the encoder wrote."""


@dataclass(frozen=True)
class EncodedBF16:
    numel: int
    freq: np.ndarray  # uint16 [256], sums to PROB_SCALE
    offsets: np.ndarray  # uint32 [groups + 1]: where each group's words start (and the end)
    states: np.ndarray  # uint32 [groups * 32]: each lane's initial decoder state
    words: np.ndarray  # uint16 [offsets[-1] + PADDING_WORDS]: the groups' streams, then zeros
    sign_mantissa: np.ndarray  # uint8 [numel]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.freq, self.offsets, self.states, self.words,
                                      self.sign_mantissa))


def num_groups(numel: int) -> int:
    return -(-numel // GROUP_SYMBOLS)


def sign_mantissa_bytes(bits: np.ndarray) -> np.ndarray:
    """sign << 7 | mantissa of each BF16 value given as uint16 bits."""
    return (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)


def exponent_histogram(bits: np.ndarray) -> np.ndarray:
    """How often each exponent byte occurs in BF16 bits (uint16), as int64 [256]."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16).ravel()
    lib = load_rans()
    if lib is None:
        return np.bincount((bits >> 7) & 0xFF, minlength=256).astype(np.int64)
    counts = np.zeros(256, dtype=np.int64)
    lib.ember_exponent_histogram(bits.ctypes.data, bits.size, counts.ctypes.data)
    return counts


def normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """Symbol counts -> frequencies summing to PROB_SCALE, every present symbol at least 1,
    rounding chosen to cost the fewest bits (greedy, one unit at a time)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("cannot build a distribution from no symbols")
    present = counts > 0
    freq = np.where(present, np.maximum(1, np.rint(counts * PROB_SCALE / total)), 0)
    freq = freq.astype(np.int64)
    if present.sum() == 1:  # a lone symbol would take the whole scale, which a slot cannot hold
        only = int(np.argmax(present))
        freq[only], freq[only ^ 1] = PROB_SCALE - 1, 1
        return freq.astype(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        while (diff := PROB_SCALE - int(freq.sum())) != 0:
            step = 1 if diff > 0 else -1
            changed = freq + step
            # bits saved (or lost) by moving one unit: counts * log2(changed / freq)
            gain = np.where(present & (changed >= 1), counts * np.log2(changed / freq), -np.inf)
            freq[int(np.argmax(gain))] += step
    return freq.astype(np.uint16)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon bound, in bits, for coding these symbol counts with their own distribution."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    nz = counts[counts > 0]
    return float(-(nz * np.log2(nz / total)).sum()) if total else 0.0


def entropy_bound_bytes(bits: np.ndarray) -> float:
    """The least a BF16 tensor (uint16 bits) takes with its exponents coded at their own
    entropy: one raw sign/mantissa byte per element plus n * H(exponent) / 8."""
    return bits.size + entropy_bits(exponent_histogram(bits)) / 8


def _lib():
    lib = load_rans()
    if lib is None:
        raise RuntimeError("the rANS encoder needs a C compiler (cc/gcc) on PATH")
    return lib


def encode_bf16(bits: np.ndarray, threads: int | None = None) -> EncodedBF16:
    """Encode BF16 bits (uint16 array, any shape) losslessly."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16).ravel()
    numel = bits.size
    groups = num_groups(numel)
    freq = normalize_freqs(exponent_histogram(bits)) if numel else np.zeros(256, np.uint16)
    slots = np.empty(groups * GROUP_SYMBOLS, dtype=np.uint16)
    lens = np.empty(groups, dtype=np.uint32)
    states = np.empty(groups * GROUP_LANES, dtype=np.uint32)
    lib = _lib()

    def encode(lo: int, hi: int) -> None:
        lib.ember_rans_encode(bits.ctypes.data, numel, freq.ctypes.data, lo, hi,
                              slots.ctypes.data, lens[lo:].ctypes.data, states.ctypes.data)

    _run_split(encode, groups, threads)
    ends = np.cumsum(lens, dtype=np.int64)
    if ends.size and ends[-1] + PADDING_WORDS > np.iinfo(np.uint32).max:
        raise ValueError(f"a tensor of {numel} elements is too large for one stream (its "
                         "word offsets overflow 32 bits); split it")
    offsets = np.concatenate([[0], ends]).astype(np.uint32)
    words = np.zeros(int(offsets[-1]) + PADDING_WORDS, dtype=np.uint16)
    lib.ember_rans_pack(slots.ctypes.data, offsets.ctypes.data, groups, words.ctypes.data)
    return EncodedBF16(numel, freq, offsets, states, words, sign_mantissa_bytes(bits))


def check_encoded(enc: EncodedBF16) -> None:
    """CorruptStreamError unless the pieces fit together (so decoding stays in bounds)."""
    groups = num_groups(enc.numel)
    expect = {"freq": (enc.freq, np.uint16, 256),
              "states": (enc.states, np.uint32, groups * GROUP_LANES),
              "offsets": (enc.offsets, np.uint32, groups + 1),
              "sign_mantissa": (enc.sign_mantissa, np.uint8, enc.numel)}
    for name, (array, dtype, size) in expect.items():
        if array.dtype != dtype or array.ndim != 1 or array.size != size:
            raise CorruptStreamError(f"{name} should be {size} x {np.dtype(dtype).name}, got "
                                     f"{array.size} x {array.dtype.name}")
    if enc.numel and int(enc.freq.sum(dtype=np.int64)) != PROB_SCALE:
        raise CorruptStreamError(f"frequencies sum to {int(enc.freq.sum())}, not {PROB_SCALE}")
    if enc.words.dtype != np.uint16 or enc.words.ndim != 1 \
            or enc.words.size < PADDING_WORDS:
        raise CorruptStreamError(f"words should be a uint16 vector of at least {PADDING_WORDS}")
    if enc.offsets[0] != 0 or np.any(np.diff(enc.offsets.astype(np.int64)) < 0) \
            or int(enc.offsets[-1]) + PADDING_WORDS != enc.words.size:
        raise CorruptStreamError(f"group offsets are not increasing or do not end "
                                 f"{PADDING_WORDS} words before the end of the word stream")


def decode_bf16(enc: EncodedBF16, out: np.ndarray | None = None,
                threads: int | None = None) -> np.ndarray:
    """The BF16 bits (flat uint16) that `enc` encodes, written into `out` when given (a
    contiguous uint16 view of the destination, e.g. the final parameter's storage)."""
    check_encoded(enc)
    if out is None:
        out = np.empty(enc.numel, dtype=np.uint16)
    if out.dtype != np.uint16 or out.size != enc.numel or not out.flags.c_contiguous:
        raise ValueError(f"out must be {enc.numel} contiguous uint16, got {out.size} "
                         f"{out.dtype} (contiguous={out.flags.c_contiguous})")
    lib = load_rans()
    if lib is None:
        from ember.compress.reference import decode_reference

        out.reshape(-1)[:] = decode_reference(enc)
        return out
    bad: list[int] = []

    def decode(lo: int, hi: int) -> None:
        code = lib.ember_rans_decode(
            enc.words.ctypes.data, enc.offsets.ctypes.data, enc.states.ctypes.data,
            enc.freq.ctypes.data, enc.sign_mantissa.ctypes.data, enc.numel, lo, hi,
            out.ctypes.data)
        if code:
            bad.append(-1 - code)

    _run_split(decode, num_groups(enc.numel), threads)
    if bad:
        raise CorruptStreamError(f"the exponent stream of group {min(bad)} does not decode "
                                 "to its recorded end state (corrupt data)")
    return out


def default_threads() -> int:
    return len(available_cores())


@cache
def _executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="ember-rans")


def _run_split(fn, total: int, threads: int | None) -> None:
    """fn(lo, hi) over [0, total) groups in up to `threads` contiguous pieces."""
    threads = max(1, threads or default_threads())
    pieces = min(threads, total)
    if pieces <= 1:
        fn(0, total)
        return
    per = math.ceil(total / pieces)
    bounds = [(lo, min(total, lo + per)) for lo in range(0, total, per)]
    for future in [_executor(threads).submit(fn, lo, hi) for lo, hi in bounds]:
        future.result()
