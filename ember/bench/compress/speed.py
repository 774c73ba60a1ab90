"""Codec throughput in GB/s of original BF16 bytes: ember with one thread (per core) and with
all cores, zipnn with one thread; the best of a few passes over a model's linear weights."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ember.bench.compress.competitors import ZipNNCodec
from ember.bench.compress.tensors import BenchTensor
from ember.compress.codec import decode_bf16, encode_bf16


def best_seconds(fn: Callable[[], object], repeats: int,
                 setup: Callable[[], object] | None = None) -> float:
    """The fastest of `repeats` timed calls of fn (setup, untimed, runs before each)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ember_speed(tensors: list[BenchTensor], threads: int, repeats: int) -> dict:
    """Compression and decompression GB/s with `threads` threads; decoding writes into
    preallocated buffers, as the loader does."""
    total = sum(t.nbytes for t in tensors)
    encoded = [encode_bf16(t.bits, threads) for t in tensors]
    outs = [np.empty_like(t.bits) for t in tensors]
    compress_s = best_seconds(lambda: [encode_bf16(t.bits, threads) for t in tensors], repeats)
    decompress_s = best_seconds(
        lambda: [decode_bf16(e, o, threads) for e, o in zip(encoded, outs)], repeats)
    return _result(threads, total, compress_s, decompress_s)


def zipnn_speed(tensors: list[BenchTensor], codec: ZipNNCodec, repeats: int) -> dict:
    total = sum(t.nbytes for t in tensors)
    blobs = [codec.compress(bytearray(t.bits.tobytes())) for t in tensors]
    copies: list[bytearray] = []

    def fresh_copies() -> None:  # zipnn clobbers its input (competitors.ZipNNCodec.compress)
        copies[:] = [bytearray(t.bits.tobytes()) for t in tensors]

    compress_s = best_seconds(lambda: [codec.compress(c) for c in copies], repeats,
                              setup=fresh_copies)
    decompress_s = best_seconds(lambda: [codec.decompress(b) for b in blobs], repeats)
    return _result(codec.threads, total, compress_s, decompress_s)


def _result(threads: int, total: int, compress_s: float, decompress_s: float) -> dict:
    return {"threads": threads, "bytes": total, "compress_s": compress_s,
            "decompress_s": decompress_s, "compress_gbps": total / compress_s / 1e9,
            "decompress_gbps": total / decompress_s / 1e9}
