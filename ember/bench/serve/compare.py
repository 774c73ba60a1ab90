"""`ember bench serve-compare`: the same request trace against two servers started one after
the other (ember, then vLLM), measured by `ember bench serve`, reported side by side.

Owns the run order, warm-up, noise accounting, the ratios and the report; server processes
live in servers.py and the load in run.py. Never runs two servers at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.run import run_serve_bench
from ember.bench.serve.servers import EngineSettings, ServerLaunch, running_server
from ember.bench.throughput import code_version, machine_info, wait_for_quiet

# (report key, summary path); throughput: higher is better, the rest are latencies in ms.
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("output_tok_s", ("output_token_throughput",)),
    ("request_s", ("request_throughput",)),
    ("ttft_p50_ms", ("ttft_ms", "p50")),
    ("ttft_p90_ms", ("ttft_ms", "p90")),
    ("itl_p50_ms", ("itl_ms", "p50")),
    ("itl_p90_ms", ("itl_ms", "p90")),
    ("itl_p99_ms", ("itl_ms", "p99")),
    ("tpot_p50_ms", ("tpot_ms", "p50")),
    ("e2e_p50_ms", ("e2e_ms", "p50")),
    ("e2e_p90_ms", ("e2e_ms", "p90")),
)
TARGET_THROUGHPUT_RATIO = 1.3  # the target: >= 1.3x output tok/s at <= p90 ITL


@dataclass(frozen=True)
class CompareConfig:
    load: ServeBenchConfig  # the trace; its url/output/plot are replaced for each server
    engine: EngineSettings  # what both servers are started with
    out_dir: Path
    repeats: int = 1  # rounds; odd rounds run the servers in reverse order
    num_warmup: int = 8  # short unmeasured requests after /health, before the trace
    quiet_wait_s: float = 0.0  # before each server: wait up to this long for idle CPUs
    plot: bool = True  # a PNG per measured run

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.num_warmup < 0:
            raise ValueError(f"num_warmup must be >= 0, got {self.num_warmup}")


def _dig(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def pick_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    return {name: _dig(summary, path) for name, path in METRICS}


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _warm_up(cfg: CompareConfig, url: str) -> None:
    """A few short requests (other prompts) so first-request costs stay out of the trace."""
    if cfg.num_warmup == 0:
        return
    warm = replace(cfg.load, url=url, num_prompts=cfg.num_warmup, seed=cfg.load.seed + 7919,
                   output_len=min(16, cfg.load.output_len), rate=math.inf, output=None,
                   plot=None, slo_ttft_ms=None, slo_itl_ms=None, slo_e2e_ms=None)
    with contextlib.redirect_stdout(sys.stderr):
        run_serve_bench(warm)


def measure_server(cfg: CompareConfig, launch: ServerLaunch, round_idx: int) -> dict[str, Any]:
    """Start one server, warm it up, run the trace, stop it; the run's record."""
    tag = f"{launch.name}-r{round_idx}"
    quiet = wait_for_quiet(cfg.quiet_wait_s) if cfg.quiet_wait_s > 0 else {}
    print(f"[serve-compare] round {round_idx}: starting {launch.name} ...", file=sys.stderr,
          flush=True)
    t_start = time.perf_counter()
    with running_server(launch, cfg.out_dir / "logs" / f"{tag}.log") as server:
        ready_s = time.perf_counter() - t_start
        _warm_up(cfg, server.url)
        run_cfg = replace(cfg.load, url=server.url, output=cfg.out_dir / f"{tag}.json",
                          plot=cfg.out_dir / f"{tag}.png" if cfg.plot else None)
        busy0, server0, own0 = _busy_cpu_s(), server.cpu_seconds(), _own_cpu_s()
        t0 = time.perf_counter()
        summary = run_serve_bench(run_cfg)
        wall_s = time.perf_counter() - t0
        server_cpu_s, client_cpu_s = server.cpu_seconds() - server0, _own_cpu_s() - own0
        other_cpu_s = max(0.0, _busy_cpu_s() - busy0 - server_cpu_s - client_cpu_s)
    num_cpus = psutil.cpu_count() or 1
    record = {
        "engine": launch.name, "round": round_idx, "ready_s": ready_s,
        "exit_code": server.proc.returncode, "processes_left": server.alive_pids(),
        "argv": list(launch.argv), "env": launch.env, "report": str(run_cfg.output),
        "metrics": pick_metrics(summary), "summary": summary,
        # Shares of both cores while the trace ran; "other" above ~5% marks a disturbed run.
        "cpu": {"server_frac": server_cpu_s / (wall_s * num_cpus),
                "client_frac": client_cpu_s / (wall_s * num_cpus),
                "other_frac": other_cpu_s / (wall_s * num_cpus)},
        **quiet,
    }
    print(f"[serve-compare] round {round_idx}: {launch.name} "
          f"{record['metrics']['output_tok_s'] or 0:.1f} output tok/s, "
          f"other CPU {100 * record['cpu']['other_frac']:.0f}%", file=sys.stderr, flush=True)
    return record


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the highest output throughput (the least disturbed on a shared box)."""
    return max(runs, key=lambda r: r["metrics"]["output_tok_s"] or 0.0)


def compare_runs(names: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best round per server, ratios first/second per metric, the same-trace check, the target."""
    subject, baseline = names
    best = {name: _best([r for r in runs if r["engine"] == name]) for name in names}
    a, b = best[subject]["metrics"], best[baseline]["metrics"]
    ratios = {k: (a[k] / b[k] if a[k] is not None and b[k] else None) for k in a}
    totals = {name: {k: best[name]["summary"][k] for k in
                     ("num_completed", "num_errors", "total_prompt_tokens",
                      "total_completion_tokens")} for name in names}
    tput, itl_p90 = ratios["output_tok_s"], (a["itl_p90_ms"], b["itl_p90_ms"])
    return {
        "subject": subject, "baseline": baseline,
        "best_round": {name: best[name]["round"] for name in names},
        "metrics": {name: best[name]["metrics"] for name in names},
        "ratios": ratios,
        "same_trace": totals[subject] == totals[baseline],
        "totals": totals,
        "target": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "throughput_met": tput is not None and tput >= TARGET_THROUGHPUT_RATIO,
            "itl_p90_met": None not in itl_p90 and itl_p90[0] <= itl_p90[1],
        },
    }


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def to_table(result: dict[str, Any]) -> str:
    """Markdown: one row per metric, both servers and the ratio subject/baseline."""
    s, b = result["subject"], result["baseline"]
    lines = [f"| metric | {s} | {b} | {s} / {b} |", "|---|---:|---:|---:|"]
    for name, _ in METRICS:
        digits = 2 if name == "request_s" else 1
        lines.append(f"| {name} | {_fmt(result['metrics'][s][name], digits)} | "
                     f"{_fmt(result['metrics'][b][name], digits)} | "
                     f"{_fmt(result['ratios'][name], 2)}× |")
    t = result["target"]
    lines.append("")
    lines.append(f"same trace (requests, prompt and output tokens): "
                 f"{'yes' if result['same_trace'] else 'NO: ' + json.dumps(result['totals'])}; "
                 f"target ≥ {t['throughput_ratio_min']}× output tok/s: "
                 f"{'met' if t['throughput_met'] else 'not met'}; p90 ITL ≤ {b}'s: "
                 f"{'met' if t['itl_p90_met'] else 'not met'}")
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While running, SIGTERM unwinds like Ctrl-C, so every started server is torn down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_compare(cfg: CompareConfig, launches: list[ServerLaunch]) -> dict[str, Any]:
    """Every round runs each launch alone (reversed order in odd rounds); writes
    compare.json / compare.md under cfg.out_dir and returns the report."""
    names = [launch.name for launch in launches]
    if len(launches) != 2 or len(set(names)) != 2:
        raise ValueError(f"serve-compare needs two servers with distinct names, got {names}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with _sigterm_as_interrupt():
        for round_idx in range(cfg.repeats):
            order = launches if round_idx % 2 == 0 else launches[::-1]
            for launch in order:
                runs.append(measure_server(cfg, launch, round_idx))
    result = compare_runs(names, runs)
    report = {
        "machine": machine_info(), "code": code_version(), "command": " ".join(sys.argv),
        "load": cfg.load.to_json(),
        "engine_settings": {k: str(v) if isinstance(v, Path) else v
                            for k, v in vars(cfg.engine).items()},
        "repeats": cfg.repeats, "num_warmup": cfg.num_warmup,
        **result, "runs": runs,
    }
    (cfg.out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    (cfg.out_dir / "compare.md").write_text(to_table(result) + "\n")
    return report
