"""`ember bench router-overhead` end to end on a small setting: every token of every stream
is timed on both paths (no timing assertions, only that the measurement is whole)."""

from __future__ import annotations

from ember.bench.router_overhead import (
    RouterOverheadConfig,
    router_overhead_markdown,
    run_router_overhead,
)


def test_every_token_is_timed_directly_and_through_the_router():
    cfg = RouterOverheadConfig(concurrency=(1, 3), num_rounds=2, num_tokens=6, interval_ms=2.0)
    report = run_router_overhead(cfg)
    assert [row["concurrency"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        n = row["concurrency"]
        for path in ("direct", "router"):
            assert row[f"{path}_token_ms"]["n"] == cfg.num_rounds * n * (cfg.num_tokens - 1)
            assert row[f"{path}_first_ms"]["n"] == cfg.num_rounds * n
            assert 0 < row[f"{path}_token_ms"]["p50"] <= row[f"{path}_token_ms"]["p99"]
    assert "added per token" in router_overhead_markdown(report)
