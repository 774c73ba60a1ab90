"""DeadlineWatch fails late futures at their deadline and leaves finished ones alone."""

import time
from concurrent.futures import Future

import pytest

from ember.kv.transfer.deadline import DeadlineWatch


def test_late_future_fails_at_its_deadline_and_done_ones_are_kept() -> None:
    watch = DeadlineWatch()
    late, early, later = Future(), Future(), Future()
    start = time.monotonic()
    watch.watch(late, 0.2, TimeoutError("late"))
    watch.watch(later, 5.0, TimeoutError("later"))
    watch.watch(early, 0.1, TimeoutError("early"))
    early.set_result(1)
    with pytest.raises(TimeoutError, match="late"):
        late.result(10.0)
    assert 0.15 < time.monotonic() - start < 4.5  # its own deadline, not `later`'s 5 s
    assert early.result() == 1 and not later.done()
    later.set_result(2)  # finishing after being watched is fine
    watch.close()
