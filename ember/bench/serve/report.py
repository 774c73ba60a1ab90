"""Turns request results into the run's summary: percentiles, throughput, goodput, errors.

Pure functions over `RequestResult`s; prints a short table and writes the JSON report.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ember.bench.serve.client import RequestResult
from ember.bench.serve.config import ServeBenchConfig

PERCENTILES = (50, 90, 99)


def latency_stats_ms(values_s: list[float]) -> dict[str, float | int | None]:
    """Count, mean and p50/p90/p99 in milliseconds (None for an empty sample)."""
    stats: dict[str, float | int | None] = {"count": len(values_s)}
    arr = np.asarray(values_s, dtype=np.float64) * 1e3
    stats["mean"] = float(arr.mean()) if arr.size else None
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(arr, p)) if arr.size else None
    return stats


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    """A completed request within every given SLO; `itl` is judged on the request's TPOT."""
    if not result.success:
        return False
    measured = {"ttft": result.ttft_s, "itl": result.tpot_s, "e2e": result.e2e_s}
    for key, limit_ms in slos_ms.items():
        value = measured[key]
        if key == "itl" and value is None:  # one output token: no inter-token time to judge
            continue
        if value is None or value * 1e3 > limit_ms:
            return False
    return True


def _error_key(result: RequestResult) -> str:
    if result.status is None:
        return "connection"
    return str(result.status) if result.status != 200 else "stream"


def summarize(results: list[RequestResult], duration_s: float,
              slos_ms: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    completion = sum(r.completion_tokens or 0 for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    per_s = (lambda n: n / duration_s if duration_s > 0 else None)  # noqa: E731
    error_examples: dict[str, str] = {}
    for r in failed:
        error_examples.setdefault(_error_key(r), r.error or "")
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_errors": len(failed),
        "errors_by_status": dict(Counter(_error_key(r) for r in failed)),
        "error_examples": error_examples,
        "duration_s": duration_s,
        "total_prompt_tokens": prompt,
        "total_completion_tokens": completion,
        "total_cached_tokens": sum(cached) if cached else None,
        "prefix_cache_hit_ratio": (sum(cached) / prompt) if cached and prompt else None,
        "usage_reported": all(r.has_usage for r in ok),
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(completion),
        "total_token_throughput": per_s(prompt + completion),
        "goodput": None,
        "ttft_ms": latency_stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": latency_stats_ms([g for r in ok for g in r.itl_s]),
        "tpot_ms": latency_stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in ok]),
    }
    if slos_ms:
        num_good = sum(meets_slos(r, slos_ms) for r in ok)
        summary["goodput"] = {"slos_ms": dict(slos_ms), "num_good": num_good,
                              "requests_per_s": per_s(num_good)}
    if any(r.session_id is not None for r in results):
        summary["sessions"] = _session_summary(results)
    return summary


def _session_summary(results: list[RequestResult]) -> dict[str, Any]:
    by_turn: dict[int, list[RequestResult]] = {}
    for r in results:
        if r.success:
            by_turn.setdefault(r.turn_idx, []).append(r)
    return {
        "num_sessions": len({r.session_id for r in results}),
        "ttft_ms_mean_by_turn": {t: float(np.mean([r.ttft_s for r in rs
                                                   if r.ttft_s is not None] or [np.nan]) * 1e3)
                                 for t, rs in sorted(by_turn.items())},
        "prompt_tokens_mean_by_turn": {t: float(np.mean([r.prompt_tokens or 0 for r in rs]))
                                       for t, rs in sorted(by_turn.items())},
    }


def _fmt(value: float | int | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_table(summary: dict[str, Any]) -> str:
    """A short human-readable view of the summary."""
    lines = [
        f"requests: {summary['num_completed']} completed, {summary['num_errors']} failed "
        f"{summary['errors_by_status'] or ''} in {summary['duration_s']:.2f} s",
        f"throughput: {_fmt(summary['request_throughput'])} req/s, "
        f"{_fmt(summary['output_token_throughput'], 1)} output tok/s, "
        f"{_fmt(summary['total_token_throughput'], 1)} total tok/s",
    ]
    for key, message in summary["error_examples"].items():
        lines.append(f"  error {key}: {message[:120]}")
    if summary["goodput"] is not None:
        g = summary["goodput"]
        lines.append(f"goodput: {_fmt(g['requests_per_s'])} req/s "
                     f"({g['num_good']}/{summary['num_completed']} within {g['slos_ms']} ms)")
    if summary["prefix_cache_hit_ratio"] is not None:
        lines.append(f"prefix cache hit ratio: {summary['prefix_cache_hit_ratio']:.3f}")
    lines.append(f"{'ms':<6}{'mean':>10}" + "".join(f"{'p' + str(p):>10}" for p in PERCENTILES))
    for key in ("ttft", "itl", "tpot", "e2e"):
        stats = summary[f"{key}_ms"]
        lines.append(f"{key.upper():<6}{_fmt(stats['mean']):>10}"
                     + "".join(f"{_fmt(stats[f'p{p}']):>10}" for p in PERCENTILES))
    return "\n".join(lines)


def write_json(path: Path, cfg: ServeBenchConfig, model: str, summary: dict[str, Any],
               results: list[RequestResult]) -> None:
    """The report: arguments, timestamp, model, summary, and every request's measurements."""
    report = {
        "args": cfg.to_json(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model,
        "summary": summary,
        "requests": [r.to_json() for r in sorted(results, key=lambda r: r.request_idx)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
