"""Numbers from one simulation run, and the markdown tables of a sweep.

Hit ratio = prompt tokens found cached / prompt tokens; TTFT = arrival at the router to the
first token; ITL = every gap between two tokens of one request; throughput = output tokens
/ (last answer - first arrival).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ember.bench.fleet_sim.sim import SimResult


def _ms(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1000.0) if len(values) else 0.0


def session_moves(result: SimResult) -> int:
    """Turns served by another worker than their session's previous turn."""
    last: dict[int, str] = {}
    moves = 0
    for rec in sorted(result.records, key=lambda r: (r.session_idx, r.turn_idx)):
        moves += rec.session_idx in last and last[rec.session_idx] != rec.worker_url
        last[rec.session_idx] = rec.worker_url
    return moves


def summarize(result: SimResult) -> dict[str, Any]:
    recs = result.records
    if any(r.finish_s is None for r in recs):
        raise RuntimeError(f"{result.policy}: a request never finished")
    prompt = sum(r.num_prompt_tokens for r in recs)
    cached = sum(r.num_cached_tokens for r in recs)
    oracle = sum(r.oracle_cached_tokens for r in recs)
    ttft = np.array([r.ttft_s for r in recs])
    itl = np.frombuffer(result.itl_s, dtype=np.float64)
    start = min(r.arrival_s for r in recs)
    span = max(r.finish_s for r in recs) - start
    busy = [b / span for b in result.worker_busy_s] if span > 0 else [0.0]
    return {
        "policy": result.policy, "num_workers": result.num_workers,
        "sessions_per_s": result.sessions_per_s, "num_requests": len(recs),
        "num_prompt_tokens": prompt, "num_cached_tokens": cached,
        "num_predicted_cached_tokens": sum(r.predicted_cached_tokens for r in recs),
        "hit_ratio": cached / prompt, "oracle_hit_ratio": oracle / prompt,
        "of_oracle": cached / oracle if oracle else 0.0,
        "ttft_ms": {"p50": _ms(ttft, 50), "p90": _ms(ttft, 90), "p99": _ms(ttft, 99),
                    "mean": float(ttft.mean() * 1000.0)},
        "itl_ms": {"p50": _ms(itl, 50), "p90": _ms(itl, 90), "p99": _ms(itl, 99)},
        "output_tok_s": sum(r.num_output_tokens for r in recs) / span,
        "duration_s": span,
        "session_moves": session_moves(result), "affinity_moves": result.affinity_moves,
        "decisions": dict(Counter(r.reason for r in recs)),
        "requests_per_worker": _spread(result),
        "busy_fraction": {"mean": sum(busy) / len(busy), "max": max(busy)},
        "num_preemptions": result.num_preemptions,
        "load_counters_at_end": result.counters_at_end,
    }


def _spread(result: SimResult) -> dict[str, int]:
    """Fewest and most requests any worker served (idle workers count as 0)."""
    counts = Counter(r.worker_url for r in result.records)
    fewest = min(counts.values()) if len(counts) == result.num_workers else 0
    return {"min": fewest, "max": max(counts.values())}


def targets(runs: list[dict[str, Any]], load: float = 0.8) -> list[dict[str, Any]]:
    """The issue's targets at `load`, per fleet size and ember variant: hit ratio >= 95% of the
    oracle's, and round-robin's p90 TTFT >= 2x ember's."""
    out = []
    for run in runs:
        if abs(run["load"] - load) > 1e-9:
            continue
        by_policy = {r["policy"]: r for r in run["results"]}
        rr = by_policy.get("round_robin")
        for name in ("ember_no_header", "ember_header"):
            if name not in by_policy or rr is None:
                continue
            ember = by_policy[name]
            speedup = rr["ttft_ms"]["p90"] / max(ember["ttft_ms"]["p90"], 1e-9)
            out.append({"num_workers": run["num_workers"], "load": load, "policy": name,
                        "of_oracle": ember["of_oracle"], "hit_target_met": ember["of_oracle"]
                        >= 0.95, "p90_ttft_vs_round_robin": speedup,
                        "ttft_target_met": speedup >= 2.0})
    return out


def to_markdown(report: dict[str, Any]) -> str:
    lines = []
    for run in report["runs"]:
        lines += [f"### {run['num_workers']} workers, load {run['load']:g} "
                  f"({run['sessions_per_s']:.3g} sessions/s, "
                  f"{run['requests_per_s']:.3g} requests/s offered)", "",
                  "| policy | hit ratio | of oracle | TTFT p50 ms | p90 | p99 | p90 vs RR | "
                  "ITL p90 ms | output tok/s | session moves | busy mean / max |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by_policy = {r["policy"]: r for r in run["results"]}
        rr_p90 = by_policy["round_robin"]["ttft_ms"]["p90"] if "round_robin" in by_policy \
            else None
        for r in run["results"]:
            vs_rr = f"{rr_p90 / max(r['ttft_ms']['p90'], 1e-9):.2f}×" if rr_p90 else "–"
            lines.append(
                f"| {r['policy']} | {r['hit_ratio']:.3f} | {100 * r['of_oracle']:.1f}% | "
                f"{r['ttft_ms']['p50']:,.0f} | {r['ttft_ms']['p90']:,.0f} | "
                f"{r['ttft_ms']['p99']:,.0f} | {vs_rr} | {r['itl_ms']['p90']:,.0f} | "
                f"{r['output_tok_s']:,.0f} | {r['session_moves']:,} | "
                f"{r['busy_fraction']['mean']:.2f} / {r['busy_fraction']['max']:.2f} |")
        lines.append("")
    if report.get("targets"):
        lines += ["| workers | policy | of oracle (≥ 95%) | p90 TTFT vs round-robin (≥ 2×) |",
                  "|---:|---|---:|---:|"]
        for t in report["targets"]:
            lines.append(f"| {t['num_workers']} | {t['policy']} | {100 * t['of_oracle']:.1f}% "
                         f"{'met' if t['hit_target_met'] else 'not met'} | "
                         f"{t['p90_ttft_vs_round_robin']:.2f}× "
                         f"{'met' if t['ttft_target_met'] else 'not met'} |")
    return "\n".join(lines) + "\n"
