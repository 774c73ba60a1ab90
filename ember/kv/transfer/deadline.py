"""DeadlineWatch: fails futures that are not done by their deadline, from one watcher thread.

It only completes the future it is given; it cannot stop the work behind it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future, InvalidStateError


class DeadlineWatch:
    def __init__(self, name: str = "kv-transfer-deadline") -> None:
        self._heap: list[tuple[float, int, Future, Exception]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, future: Future, timeout_s: float, error: Exception) -> None:
        """Set `error` on `future` if it is still pending after `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._heap and self._heap[0][2].done():  # finished writes leave in order
                heapq.heappop(self._heap)
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._order), future, error))
            if earliest:  # otherwise the watcher already wakes up sooner than needed here
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._wake:
            while not self._closed:
                while self._heap and self._heap[0][2].done():
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, _, future, error = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
                _fail(future, error)


def _fail(future: Future, error: Exception) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # it completed between the check and now
        pass
