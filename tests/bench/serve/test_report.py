"""Summary math on hand-made results: percentiles, TPOT, throughput, goodput under SLOs,
errors by status, the prefix-cache hit ratio, the table and the JSON report's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ember.bench.serve.client import RequestResult
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.report import (
    latency_stats_ms,
    meets_slos,
    summarize,
    to_table,
    write_json,
)


def _ok(idx: int, ttft_s: float, e2e_s: float, tokens: int, prompt: int = 10,
        cached: int | None = None, itl_s: list[float] | None = None) -> RequestResult:
    return RequestResult(idx, success=True, status=200, ttft_s=ttft_s, e2e_s=e2e_s,
                         itl_s=itl_s or [], prompt_tokens=prompt, completion_tokens=tokens,
                         cached_tokens=cached, has_usage=True)


def test_latency_stats_percentiles() -> None:
    stats = latency_stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["count"] == 100
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert latency_stats_ms([]) == {"count": 0, "mean": None, "p50": None, "p90": None,
                                    "p99": None}


def test_tpot_uses_usage_tokens() -> None:
    r = _ok(0, ttft_s=0.1, e2e_s=1.1, tokens=11)
    assert r.tpot_s == pytest.approx(0.1)
    assert _ok(0, 0.1, 0.2, tokens=1).tpot_s is None


def test_goodput_counts_requests_within_every_slo() -> None:
    results = [
        _ok(0, ttft_s=0.05, e2e_s=0.5, tokens=10),  # tpot 50 ms: good
        _ok(1, ttft_s=0.30, e2e_s=0.5, tokens=10),  # ttft too slow
        _ok(2, ttft_s=0.05, e2e_s=1.05, tokens=11),  # tpot 100 ms: too slow
        _ok(3, ttft_s=0.05, e2e_s=0.05, tokens=1),  # one token: no ITL to judge, good
        RequestResult(4, status=503, error="busy"),
    ]
    slos = {"ttft": 100.0, "itl": 60.0}
    assert [meets_slos(r, slos) for r in results] == [True, False, False, True, False]
    summary = summarize(results, duration_s=2.0, slos_ms=slos)
    assert summary["goodput"] == {"slos_ms": slos, "num_good": 2, "requests_per_s": 1.0}
    assert summary["request_throughput"] == pytest.approx(2.0)
    assert meets_slos(results[1], {"e2e": 500.0})
    assert not meets_slos(results[2], {"e2e": 500.0})
    assert summarize(results, 2.0, {})["goodput"] is None


def test_summary_throughput_errors_and_cache_ratio() -> None:
    results = [
        _ok(0, 0.1, 0.5, tokens=5, prompt=100, cached=0, itl_s=[0.1, 0.1, 0.1, 0.1]),
        _ok(1, 0.2, 0.6, tokens=5, prompt=100, cached=50, itl_s=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(2, status=400, error="bad"),
        RequestResult(3, status=400, error="bad"),
        RequestResult(4, status=None, error="ClientConnectorError"),
        RequestResult(5, status=200, error="stream error"),
    ]
    s = summarize(results, duration_s=2.0, slos_ms={})
    assert (s["num_requests"], s["num_completed"], s["num_errors"]) == (6, 2, 4)
    assert s["errors_by_status"] == {"400": 2, "connection": 1, "stream": 1}
    assert s["total_prompt_tokens"] == 200 and s["total_completion_tokens"] == 10
    assert s["output_token_throughput"] == pytest.approx(5.0)
    assert s["total_token_throughput"] == pytest.approx(105.0)
    assert s["prefix_cache_hit_ratio"] == pytest.approx(0.25)
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert s["itl_ms"]["count"] == 8 and s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(np.median([100.0, 100.0]))
    assert "sessions" not in s
    table = to_table(s)
    for key in ("TTFT", "ITL", "TPOT", "E2E", "prefix cache hit ratio", "req/s"):
        assert key in table


def test_json_report_has_args_summary_and_requests(tmp_path) -> None:
    cfg = ServeBenchConfig(url="http://x", api_key="secret", slo_ttft_ms=100.0,
                           output=tmp_path / "out.json")
    results = [_ok(1, 0.2, 0.5, tokens=5), _ok(0, 0.1, 0.4, tokens=4)]
    summary = summarize(results, 1.0, cfg.slos_ms)
    write_json(cfg.output, cfg, "m", summary, results)
    report = json.loads(cfg.output.read_text())
    assert set(report) == {"args", "timestamp", "model", "summary", "requests"}
    assert report["args"]["api_key"] == "***" and report["args"]["rate"] == "inf"
    assert report["args"]["slo_ttft_ms"] == 100.0
    assert report["model"] == "m"
    assert [r["request_idx"] for r in report["requests"]] == [0, 1]
    assert report["requests"][0]["ttft_ms"] == 100.0
    assert report["summary"]["goodput"]["num_good"] == 1
