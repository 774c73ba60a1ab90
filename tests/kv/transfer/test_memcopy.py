"""copy_segments (C and the per-segment fallback) against numpy slicing."""

import numpy as np
import pytest

from ember.kv.transfer import memcopy


@pytest.mark.parametrize("compiled", [True, False])
def test_copy_segments_matches_slicing(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(memcopy, "_library", lambda: None)
    elif memcopy._library() is None:
        pytest.skip("no C compiler here")
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    dst = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    segments = np.array([[0, 4096, 100], [5000, 0, 3000], [60000, 65000, 536], [7, 9, 1]])
    expected = dst.copy()
    for s, d, n in segments:
        expected[d:d + n] = src[s:s + n]
    memcopy.copy_segments(dst.ctypes.data, src.ctypes.data, segments)
    assert np.array_equal(dst, expected)
    memcopy.copy_segments(dst.ctypes.data, src.ctypes.data, np.zeros((0, 3), np.int64))
