"""RawTransferProbe samples real raw writes into a peer process while it is open."""

from __future__ import annotations

import time

from ember.bench.raw_probe import RawTransferProbe


def test_probe_samples_raw_writes_until_closed() -> None:
    with RawTransferProbe("shm", nbytes=8 << 20, every_s=0.05) as probe:
        deadline = time.monotonic() + 30
        while len(probe.samples_gb_s) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    count = len(probe.samples_gb_s)
    assert count >= 3 and all(rate > 0 for rate in probe.samples_gb_s)
    assert probe.median_gb_s is not None
    time.sleep(0.2)
    assert len(probe.samples_gb_s) == count  # the thread stopped with the context
