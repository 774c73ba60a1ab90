"""Cold reads: drop files from the page cache (fsync, then POSIX_FADV_DONTNEED) and check by
timing that the drop worked. Linux only; touches nothing but the files it is given."""

from __future__ import annotations

import os
import time
from pathlib import Path

READ_CHUNK = 8 << 20
RAM_SPEED_FACTOR = 2.0  # a cold read at least this much slower than a warm one is from disk


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: list[Path]) -> int:
    """Read every byte (plain reads, no mmap); the number of bytes read."""
    total = 0
    buf = bytearray(READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def timed_read(paths: list[Path], cold: bool) -> float:
    if cold:
        drop_from_page_cache(paths)
    start = time.perf_counter()
    read_files(paths)
    return time.perf_counter() - start


def check_cache_drop(paths: list[Path]) -> dict:
    """Read the files cold twice and warm once: the drop works when the second cold read is
    well below RAM speed (the first one may still see the writer's dirty pages)."""
    timed_read(paths, cold=True)
    cold_s = timed_read(paths, cold=True)
    warm_s = min(timed_read(paths, cold=False) for _ in range(2))
    return {"cold_read_s": cold_s, "warm_read_s": warm_s,
            "is_verified": cold_s >= RAM_SPEED_FACTOR * warm_s}
