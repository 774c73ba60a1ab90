"""`ember bench serve` end to end through `ember.cli.main` against the scripted fake server."""

from __future__ import annotations

import json

from ember.cli import main
from tests.bench.serve.fake_openai import MODEL_ID, FakeOpenAIServer


def test_sessions_run_writes_json_and_png(tmp_path, capsys) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    with FakeOpenAIServer(ttft_s=0.01, itl_s=0.002) as server:
        rc = main(["bench", "serve", "--url", server.url, "--dataset", "sessions",
                   "--num-prompts", "6", "--turns", "3", "--rate", "50",
                   "--max-concurrency", "4", "--system-prompt-len", "40",
                   "--input-len", "8", "--output-len", "4", "--slo-ttft-ms", "10000",
                   "--slo-itl-ms", "10000", "--slo-e2e-ms", "10000",
                   "--output", str(out), "--plot", str(png)])
    assert rc == 0
    assert {rec.body["model"] for rec in server.received} == {MODEL_ID}
    assert len(server.received) == 6
    report = json.loads(out.read_text())
    assert set(report) == {"args", "timestamp", "model", "summary", "requests"}
    assert report["model"] == MODEL_ID and report["args"]["dataset"] == "sessions"
    summary = report["summary"]
    for key in ("num_completed", "num_errors", "errors_by_status", "duration_s",
                "request_throughput", "output_token_throughput", "total_token_throughput",
                "goodput", "prefix_cache_hit_ratio", "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms",
                "sessions"):
        assert key in summary
    assert summary["num_completed"] == 6 and summary["goodput"]["num_good"] == 6
    assert summary["total_completion_tokens"] == 24
    assert summary["prefix_cache_hit_ratio"] > 0
    assert {(r["session_id"], r["turn_idx"]) for r in report["requests"]} == {
        (f"session-0-{s}", t) for s in range(2) for t in range(3)}
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "goodput" in printed


def test_completions_endpoint_with_ignore_eos(tmp_path) -> None:
    out = tmp_path / "c.json"
    with FakeOpenAIServer(ttft_s=0.0, itl_s=0.0, tokens_per_chunk=2) as server:
        rc = main(["bench", "serve", "--url", server.url, "--endpoint", "completions",
                   "--model", "chosen", "--num-prompts", "5", "--input-len", "16",
                   "--output-len", "6", "--ignore-eos", "--output", str(out)])
    assert rc == 0
    assert all(rec.path == "/v1/completions" for rec in server.received)
    assert all(rec.body["model"] == "chosen" and rec.body["ignore_eos"] is True
               and isinstance(rec.body["prompt"], str) for rec in server.received)
    summary = json.loads(out.read_text())["summary"]
    assert summary["num_completed"] == 5 and summary["total_completion_tokens"] == 30
    assert summary["goodput"] is None


def test_bad_arguments_and_total_failure_exit_non_zero(capsys) -> None:
    assert main(["bench", "serve", "--url", "http://127.0.0.1:1", "--range-ratio", "1.5"]) == 2
    assert "range_ratio" in capsys.readouterr().err
    with FakeOpenAIServer(error_at={0: 400, 1: 400}) as server:
        rc = main(["bench", "serve", "--url", server.url, "--num-prompts", "2",
                   "--output-len", "2"])
    assert rc == 1
    assert "400" in capsys.readouterr().out
