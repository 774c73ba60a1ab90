"""`ember bench router-overhead` end to end on a small setting: every token of every stream
is timed on both paths (no timing assertions, only that the measurement is whole)."""

from __future__ import annotations

import os

import pytest

from ember.bench.router_overhead import (
    RouterOverheadConfig,
    router_overhead_markdown,
    run_router_overhead,
)


@pytest.mark.parametrize("router_cpus", [(), (0,)], ids=["shared", "router-on-cpu-0"])
def test_every_token_is_timed_directly_and_through_the_router(router_cpus):
    if router_cpus and not set(router_cpus) < os.sched_getaffinity(0):
        pytest.skip("needs 2 CPUs to give the router one of its own")
    cfg = RouterOverheadConfig(concurrency=(1, 3), num_rounds=2, num_tokens=6, interval_ms=2.0,
                               router_cpus=router_cpus)
    affinity = os.sched_getaffinity(0)
    report = run_router_overhead(cfg)
    assert os.sched_getaffinity(0) == affinity  # the client's CPUs are given back
    assert [row["concurrency"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        n = row["concurrency"]
        for path in ("direct", "router"):
            assert row[f"{path}_token_ms"]["n"] == cfg.num_rounds * n * (cfg.num_tokens - 1)
            assert row[f"{path}_first_ms"]["n"] == cfg.num_rounds * n
            assert 0 < row[f"{path}_token_ms"]["p50"] <= row[f"{path}_token_ms"]["p99"]
        assert row["router_cpu_us_per_chunk"] > 0
    assert "added per token" in router_overhead_markdown(report)
