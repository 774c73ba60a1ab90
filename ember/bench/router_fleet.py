"""`ember bench router-fleet`: a real fleet on this machine, N `ember serve` workers behind
`ember router`, on the multi-turn `sessions` trace, once per routing policy (fresh workers
each time, so every policy starts from cold caches).

Load: the fleet's capacity is measured first, as sessions completed per second when every
session arrives at once under least-requests routing; each policy then gets Poisson session
arrivals at `load` x that rate. Hit ratio = cached prompt tokens / prompt tokens (the workers'
own usage counts); the oracle's is the trace's ideal, every prompt token that repeats a prefix
some earlier request sent (an unbounded cache that every request finds).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.prefix_cache import ideal_cached_tokens, prompt_tokens_sent, run_sessions
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.report import summarize
from ember.bench.serve.servers import ServerLaunch, ServerProcess, free_port

SERVED_NAME = "bench"
POLICY_FLAGS = {
    "round_robin": ("--routing-policy", "round_robin"),
    "least_requests": ("--routing-policy", "least_requests"),
    "prefix_tree": ("--routing-policy", "prefix_tree"),
    "ember-no-affinity": ("--routing-policy", "ember", "--no-session-affinity"),
    "ember": ("--routing-policy", "ember"),
}


@dataclass(frozen=True)
class RouterFleetConfig:
    model_dir: str
    num_workers: int = 3
    policies: tuple[str, ...] = tuple(POLICY_FLAGS)
    sessions: int = 24
    turns: int = 6
    system_prompt_len: int = 1000
    input_len: int = 96  # new tokens per turn
    output_len: int = 32
    load: float = 0.8  # fraction of the measured capacity
    rate: float | None = None  # sessions/s; None: load x measured capacity
    kv_cache_bytes: int = 8 << 20  # per worker: room for about a third of the sessions
    num_threads: int = 1  # per worker
    affinity_load_factor: float = 1.25  # the router's bound before a session moves
    seed: int = 0


@contextlib.contextmanager
def _fleet(cfg: RouterFleetConfig, policy: str, tmp: Path) -> Iterator[str]:
    """Started workers (each publishing KV events) and a router in front; yields its URL."""
    procs: list[ServerProcess] = []
    try:
        for i in range(cfg.num_workers):
            argv = (sys.executable, "-m", "ember.cli", "serve", "--model", cfg.model_dir,
                    "--served-model-name", SERVED_NAME, "--kv-cache-memory",
                    str(cfg.kv_cache_bytes), "--num-threads", str(cfg.num_threads),
                    "--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}")
            procs.append(ServerProcess(ServerLaunch(f"worker{i}", argv), tmp / f"w{i}.log"))
        for proc in procs:
            proc.wait_ready()
        argv = (sys.executable, "-m", "ember.cli", "router", "--model", cfg.model_dir,
                "--health-interval-s", "0.5", *POLICY_FLAGS[policy],
                "--affinity-load-factor", str(cfg.affinity_load_factor),
                *(arg for p in procs for arg in ("--worker", p.url)))
        router = ServerProcess(ServerLaunch("router", argv, start_timeout_s=120),
                               tmp / "router.log")
        procs.append(router)
        router.wait_ready()
        yield router.url
    finally:
        for proc in reversed(procs):
            proc.stop()


def _load_config(cfg: RouterFleetConfig, url: str, rate: float) -> ServeBenchConfig:
    return ServeBenchConfig(
        url=url, dataset="sessions", model=SERVED_NAME, num_prompts=cfg.sessions * cfg.turns,
        sessions=cfg.sessions, turns=cfg.turns, system_prompt_len=cfg.system_prompt_len,
        input_len=cfg.input_len, output_len=cfg.output_len, range_ratio=0.25, rate=rate,
        ignore_eos=True, tokenizer=cfg.model_dir, seed=cfg.seed)


def _run_policy(cfg: RouterFleetConfig, policy: str, rate: float,
                tokenizer: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ember-router-fleet-") as tmp, \
            _fleet(cfg, policy, Path(tmp)) as url:
        sessions, results, duration_s = asyncio.run(
            run_sessions(_load_config(cfg, url, rate), tokenizer))
        router_metrics = _router_counters(url)
    summary = summarize(results, duration_s, {})
    ok = sorted((r for r in results if r.success), key=lambda r: r.start_s)
    ideal = sum(ideal_cached_tokens(prompt_tokens_sent(tokenizer, sessions, ok)))
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    return {"policy": policy, "rate": rate, "num_requests": len(results),
            "num_errors": len(results) - len(ok), "hit_ratio": cached / prompt if prompt else 0.0,
            "oracle_hit_ratio": ideal / prompt if prompt else 0.0,
            "ttft_ms": summary["ttft_ms"], "itl_ms": summary["itl_ms"],
            "output_tok_s": summary["output_token_throughput"],
            "sessions_per_s": len(sessions) / duration_s, "duration_s": duration_s,
            "router": router_metrics}


def _router_counters(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                label = ",".join(f"{v}" for v in sample.labels.values())
                counters[sample.name.removeprefix("ember_router:") + (f"[{label}]" if label
                                                                      else "")] = sample.value
    return counters


def measure_capacity(cfg: RouterFleetConfig, tokenizer: Any) -> dict[str, Any]:
    """Sessions/s the fleet completes with every session arriving at once (least-requests)."""
    run = _run_policy(cfg, "least_requests", math.inf, tokenizer)
    return {"sessions_per_s": run["sessions_per_s"], "run": run}


def run_router_fleet_bench(cfg: RouterFleetConfig) -> dict[str, Any]:
    from ember.bench.throughput import machine_info
    from ember.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_dir)
    capacity = None
    rate = cfg.rate
    if rate is None:
        capacity = measure_capacity(cfg, tokenizer)
        rate = cfg.load * capacity["sessions_per_s"]
    runs = [_run_policy(cfg, policy, rate, tokenizer) for policy in cfg.policies]
    base = next((r for r in runs if r["policy"] == "round_robin"), None)
    for run in runs:
        run["of_oracle"] = run["hit_ratio"] / run["oracle_hit_ratio"] \
            if run["oracle_hit_ratio"] else None
        if base is not None and run["ttft_ms"]["p90"]:
            run["rr_p90_ttft_over_this"] = base["ttft_ms"]["p90"] / run["ttft_ms"]["p90"]
    return {"config": asdict(cfg), "capacity": capacity, "rate": rate, "runs": runs,
            "machine": machine_info()}


def router_fleet_markdown(report: dict[str, Any]) -> str:
    lines = ["| policy | hit ratio | of oracle | TTFT p50 / p90 (ms) | RR p90 / this | "
             "ITL p90 (ms) | output tok/s | affinity moves | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        of_oracle = f"{run['of_oracle']:.1%}" if run["of_oracle"] is not None else "-"
        speedup = f"{run['rr_p90_ttft_over_this']:.2f}x" if "rr_p90_ttft_over_this" in run \
            else "-"
        moves = run["router"].get("affinity_moves_total", 0)
        lines.append(
            f"| {run['policy']} | {run['hit_ratio']:.3f} | {of_oracle} | "
            f"{run['ttft_ms']['p50']:.0f} / {run['ttft_ms']['p90']:.0f} | {speedup} | "
            f"{run['itl_ms']['p90']:.1f} | {run['output_tok_s']:.1f} | {moves:.0f} | "
            f"{run['num_errors']} |")
    return "\n".join(lines)


def add_router_fleet_parser(sub: Any) -> None:
    rf = sub.add_parser("router-fleet", help="N real workers behind ember router on the "
                        "sessions trace, once per routing policy: hit ratio vs oracle, TTFT, "
                        "ITL, throughput.")
    rf.add_argument("--model", default=None, help="Model directory (default: the 10m bench "
                    "model).")
    rf.add_argument("--num-workers", type=int, default=3)
    rf.add_argument("--policies", default=",".join(POLICY_FLAGS),
                    help=f"Comma-separated subset of {', '.join(POLICY_FLAGS)}.")
    rf.add_argument("--sessions", type=int, default=24)
    rf.add_argument("--turns", type=int, default=6)
    rf.add_argument("--system-prompt-len", type=int, default=1000)
    rf.add_argument("--load", type=float, default=0.8, help="Fraction of measured capacity.")
    rf.add_argument("--rate", type=float, default=None,
                    help="Sessions/s (skips the capacity run).")
    rf.add_argument("--kv-cache-bytes", type=int, default=8 << 20, help="Per worker.")
    rf.add_argument("--affinity-load-factor", type=float, default=1.25,
                    help="The router's load bound before a session moves.")
    rf.add_argument("--out", type=Path, default=Path("benchmarks/router-fleet"))
    rf.set_defaults(func=_cmd_router_fleet)


def _cmd_router_fleet(args: Any) -> int:
    import json

    from ember.bench.models import build_bench_model

    cfg = RouterFleetConfig(
        model_dir=str(args.model or build_bench_model("10m")), num_workers=args.num_workers,
        policies=tuple(args.policies.split(",")), sessions=args.sessions, turns=args.turns,
        system_prompt_len=args.system_prompt_len, load=args.load, rate=args.rate,
        kv_cache_bytes=args.kv_cache_bytes, affinity_load_factor=args.affinity_load_factor)
    unknown = set(cfg.policies) - set(POLICY_FLAGS)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; choose from {list(POLICY_FLAGS)}")
    report = run_router_fleet_bench(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_fleet.json").write_text(json.dumps(report, indent=2))
    print(router_fleet_markdown(report))
    return 0


