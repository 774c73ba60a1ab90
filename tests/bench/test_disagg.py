"""`ember bench disagg`'s summary and report from synthetic results (the fleets it drives are
tested in tests/server and tests/launch)."""

from __future__ import annotations

import pytest

from ember.bench.disagg import _summary, disagg_markdown
from ember.bench.serve.client import RequestResult


def _result(idx: int, gaps: list[float], tokens: int, ok: bool = True) -> RequestResult:
    return RequestResult(idx, success=ok, ttft_s=0.05, itl_s=gaps, completion_tokens=tokens,
                         error=None if ok else "HTTP 502")


def test_summary_counts_only_successful_tokens_and_stream_gaps() -> None:
    streams = [_result(0, [0.01] * 9, 10), _result(1, [0.01] * 8 + [0.1], 10),
               _result(2, [], 0, ok=False)]
    longs = [_result(3, [0.5], 2)]
    summary = _summary(streams, longs, elapsed=2.0)
    assert summary["output_tok_s"] == 11.0
    assert summary["num_errors"] == 1 and summary["errors"] == ["HTTP 502"]
    assert summary["stream_itl_ms"]["p50"] == 10.0  # the long prompt's gap is not a stream's
    assert summary["stream_itl_ms"]["count"] == 18 and summary["stream_itl_ms"]["p99"] > 50


def test_markdown_reports_transfer_pieces_and_setup_apart() -> None:
    run = _summary([_result(0, [0.01] * 4, 5)], [_result(1, [], 1)], elapsed=1.0)
    transfer = {"bytes": 8e6, "seconds": 0.002, "segments": 64.0, "mean_segment_kib": 122.1,
                "connect_seconds": 0.03, "gb_s": 4.0, "cpu_seconds": 0.001, "gb_s_on_cpu": 8.0}
    report = {"runs": [{"setup": "disaggregated", **run, "kv_transfer": transfer,
                        "raw_transfer_gb_s": 8.0},
                       {"setup": "colocated", **run, "kv_transfer": None}],
              "quiet_raw_transfer_gb_s": 9.0,
              "ratios": {"p90_itl": 1.0, "transfer_of_raw": 0.5}}
    text = disagg_markdown(report)
    assert "| disaggregated | 10.0 / 10.0 / 10.0 |" in text
    assert "4.00 GB/s (raw, sampled during the run: 8.00 GB/s; on the quiet machine: 9.00)" in text
    assert "64 pieces of 122.1 KiB" in text
    assert "peer set-up 0.030 s" in text and "transfer_of_raw 0.50" in text
    assert "over the writer's CPU time only: 8.00 GB/s" in text


def test_streams_start_spread_over_their_cycle_then_ask_for_full_answers(monkeypatch) -> None:
    import asyncio
    import time

    import ember.bench.disagg as disagg

    asked: list[int] = []

    class Enough(Exception):
        pass

    async def fake_send(http, url, payload, headers, result, t0):
        asked.append(payload["max_tokens"])
        if len(asked) == 3:
            raise Enough
        return result

    monkeypatch.setattr(disagg, "send_request", fake_send)
    cfg = disagg.DisaggBenchConfig(model_dir="unused", stream_max_tokens=256)
    out: list[RequestResult] = []
    with pytest.raises(Enough):
        asyncio.run(disagg._steady(None, "url", "prompt", 1 / 6, cfg, 0.0,
                                   time.perf_counter() + 60, out))
    assert asked == [43, 256, 256] and len(out) == 2
