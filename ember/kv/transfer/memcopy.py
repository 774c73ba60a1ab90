"""copy_segments: many (src, dst, nbytes) memcpys between two mapped address ranges in one call.

A Python loop of ctypes.memmove costs ~2 us a segment, more than copying a 4 KiB KV segment
takes, so the loop runs in a few lines of C built once with the system compiler (cached like
the attention kernel); without a compiler it falls back to that loop. It never checks bounds:
callers do.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

from ember.kv.transfer.layout import Segments
from ember.native import load_c_library

_SOURCE = b"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#define AHEAD 4  /* segments prefetched ahead: random 4-32 KiB copies wait on page walks */

/* Streaming (non-temporal) stores: the destination is another process's pool that this
   core never reads, so skipping the read-for-ownership of each line saves a third of the
   memory traffic (cold 4 MB copies: ~6 -> ~9 GB/s here). */
static void copy_one(char *dst, const char *src, int64_t n) {
#if defined(__x86_64__)
    if ((((uintptr_t)dst | (uintptr_t)n) & 63) == 0) {
        for (int64_t k = 0; k < n; k += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + k));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + k + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + k + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + k + 48));
            _mm_stream_si128((__m128i *)(dst + k), a);
            _mm_stream_si128((__m128i *)(dst + k + 16), b);
            _mm_stream_si128((__m128i *)(dst + k + 32), c);
            _mm_stream_si128((__m128i *)(dst + k + 48), d);
        }
        return;
    }
#endif
    memcpy(dst, src, (size_t)n);
}

void copy_segments(char *dst, const char *src, const int64_t *segments, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (i + AHEAD < n) {
            const int64_t *next = segments + 3 * (i + AHEAD);
            for (int64_t k = 0; k < next[2] && k < (64 << 10); k += 4096) {
                __builtin_prefetch(src + next[0] + k, 0, 0);
                __builtin_prefetch(dst + next[1] + k, 1, 0);
            }
        }
        const int64_t *s = segments + 3 * i;  /* src_offset, dst_offset, nbytes */
        copy_one(dst + s[1], src + s[0], s[2]);
    }
#if defined(__x86_64__)
    _mm_sfence();  /* streaming stores are visible to the peer before we report done */
#endif
}
"""


def copy_segments(dst_base: int, src_base: int, segments: Segments) -> None:
    """memcpy(dst_base + dst, src_base + src, n) for each row (src, dst, n); releases the GIL."""
    if len(segments) == 0:
        return
    lib = _library()
    if lib is None:
        for src, dst, nbytes in segments.tolist():
            ctypes.memmove(dst_base + dst, src_base + src, nbytes)
        return
    table = np.ascontiguousarray(segments, dtype=np.int64)
    lib.copy_segments(ctypes.c_void_p(dst_base), ctypes.c_void_p(src_base),
                      table.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(len(table)))


@cache
def _library() -> ctypes.CDLL | None:
    lib = load_c_library("copy_segments", _SOURCE, ["-O2", "-fPIC"], ["-shared"])
    if lib is not None:
        lib.copy_segments.restype = None
    return lib
