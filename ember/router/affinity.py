"""Session affinity: consistent hashing with bounded loads (`x-session-affinity`). Maps a
session id to a worker, deterministically across processes; knows nothing of health or
load accounting beyond the numbers it is handed.
"""

from __future__ import annotations

import bisect
import hashlib


def _point(key: str) -> int:
    """A position on the ring: 64 bits of BLAKE2b, never Python's salted hash()."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class AffinityRing:
    """Each worker owns `replicas` points on a 64-bit ring; a session belongs to the first
    worker clockwise of its own point that is eligible and not overloaded."""

    def __init__(self, replicas: int = 100) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self._points: list[int] = []  # sorted
        self._owners: list[str] = []  # _owners[i] owns _points[i]
        self._worker_ids: set[str] = set()

    def add(self, worker_id: str) -> None:
        if worker_id in self._worker_ids:
            return
        self._worker_ids.add(worker_id)
        for i in range(self.replicas):
            point = _point(f"{worker_id}#{i}")
            idx = bisect.bisect_left(self._points, point)
            self._points.insert(idx, point)
            self._owners.insert(idx, worker_id)

    def remove(self, worker_id: str) -> None:
        if worker_id not in self._worker_ids:
            return
        self._worker_ids.discard(worker_id)
        kept = [(p, w) for p, w in zip(self._points, self._owners) if w != worker_id]
        self._points = [p for p, _ in kept]
        self._owners = [w for _, w in kept]

    @property
    def worker_ids(self) -> set[str]:
        return set(self._worker_ids)

    def home(self, session_id: str) -> str | None:
        """The session's worker ignoring load and health (to count moves against)."""
        if not self._points:
            return None
        return self._owners[bisect.bisect(self._points, _point(session_id)) % len(self._points)]

    def pick(self, session_id: str, loads: dict[str, float], eligible: set[str],
             load_factor: float = 1.25, min_mean_load: float = 1.0) -> str | None:
        """The first worker clockwise of the session that is in `eligible` and whose load is
        at most load_factor × max(mean load over the eligible ring workers, min_mean_load);
        None when no ring worker is eligible. Workers missing from `loads` count as idle.

        Some worker always qualifies (the least loaded is at most the mean), so a session
        leaves its home only while the home is over the bound, and comes back after."""
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        candidates = eligible & self._worker_ids
        if not candidates:
            return None
        mean = sum(loads.get(w, 0.0) for w in candidates) / len(candidates)
        bound = load_factor * max(mean, min_mean_load)
        num_points = len(self._points)
        start = bisect.bisect(self._points, _point(session_id))
        seen: set[str] = set()
        for step in range(num_points):
            worker_id = self._owners[(start + step) % num_points]
            if worker_id in seen:
                continue
            seen.add(worker_id)
            if worker_id in candidates and loads.get(worker_id, 0.0) <= bound:
                return worker_id
        # only float rounding of the mean gets here (load_factor == 1, equal loads)
        return min(candidates, key=lambda w: loads.get(w, 0.0))
