"""Timing GPU work with CUDA events (device time, not the host's launch time)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_median_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median milliseconds of `fn`'s GPU work over `repeats` calls, each timed alone."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
