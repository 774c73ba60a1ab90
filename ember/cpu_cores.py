"""Binding a worker to CPU cores: parsing core lists ("0-3,6"), applying them to every thread
of this process (threads started later inherit them), and splitting this machine's cores
between the workers of a fleet so that no two share one.
"""

from __future__ import annotations

import os


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6), the format of taskset -c and /sys cpulist files."""
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high) if sep else int(low)
        except ValueError:
            raise ValueError(f"cpu_cores: {part!r} is not a core number or range "
                             "(expected e.g. '0-3,6')") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu_cores: bad range {part!r}")
        cores.update(range(first, last + 1))
    if not cores:
        raise ValueError("cpu_cores: no cores given")
    return tuple(sorted(cores))


def format_cpu_list(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores)


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity, which taskset and cgroups narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def bind_to_cores(cores: tuple[int, ...]) -> None:
    """Restrict every thread of this process to `cores`. sched_setaffinity acts on one
    thread, so threads already running (a thread pool started at import) are set one by one;
    threads and processes started afterwards inherit the mask."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cpu_cores: binding to cores needs Linux (sched_setaffinity)")
    allowed = set(available_cores())
    outside = sorted(set(cores) - allowed)
    if outside:
        raise ValueError(f"cpu_cores: cores {outside} are not available to this process "
                         f"(available: {format_cpu_list(tuple(sorted(allowed)))})")
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def split_cores(num_workers: int, cores: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Disjoint, equal, contiguous shares of `cores` (default: all available), one per
    worker; leftover cores go unused. Needs at least one core per worker."""
    cores = cores or available_cores()
    each = len(cores) // num_workers
    if each < 1:
        raise ValueError(f"cannot give {num_workers} workers a core each: only {len(cores)} "
                         "available")
    return [cores[i * each:(i + 1) * each] for i in range(num_workers)]
