"""A sweep: for each fleet size and load, every policy on the same trace, plus the capacity
that loads are fractions of. Returns the JSON report; prints progress to stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from typing import Any

from ember.bench.fleet_sim.capacity import measure_capacity
from ember.bench.fleet_sim.config import SweepConfig, TraceConfig, WorkerConfig
from ember.bench.fleet_sim.report import summarize, targets
from ember.bench.fleet_sim.sim import FleetSim
from ember.bench.fleet_sim.step_model import StepModel
from ember.bench.fleet_sim.workload import Trace


def run_one(trace: Trace, policy: str, num_workers: int, sessions_per_s: float,
            worker_cfg: WorkerConfig, step_model: StepModel, sweep: SweepConfig
            ) -> dict[str, Any]:
    sim = FleetSim(trace, policy, num_workers, sessions_per_s, worker_cfg, step_model,
                   sweep.decode_weight, sweep.seed)
    return summarize(sim.run())


def run_sweep(sweep: SweepConfig, trace_cfg: TraceConfig, worker_cfg: WorkerConfig,
              step_model: StepModel, calibration: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    capacity = measure_capacity(trace_cfg, worker_cfg, step_model, sweep.capacity_requests)
    _log(f"capacity: {capacity['requests_per_s']:.4g} requests/s per worker "
         f"(no caching: {capacity['no_caching_requests_per_s']:.4g})")
    runs = []
    for num_workers in sweep.fleet_sizes:
        trace = Trace(replace(trace_cfg, num_sessions=sweep.sessions_per_worker * num_workers))
        for load in sweep.loads:
            requests_per_s = load * num_workers * capacity["requests_per_s"]
            sessions_per_s = requests_per_s / trace_cfg.turns
            results = []
            for policy in sweep.policies:
                t0 = time.perf_counter()
                result = run_one(trace, policy, num_workers, sessions_per_s, worker_cfg,
                                 step_model, sweep)
                results.append(result)
                _log(f"{num_workers} workers, load {load:g}, {policy}: hit "
                     f"{result['hit_ratio']:.3f} ({100 * result['of_oracle']:.1f}% of oracle), "
                     f"TTFT p90 {result['ttft_ms']['p90']:,.0f} ms "
                     f"[{time.perf_counter() - t0:.0f} s]")
            runs.append({"num_workers": num_workers, "load": load,
                         "requests_per_s": requests_per_s, "sessions_per_s": sessions_per_s,
                         "num_sessions": len(trace), "results": results})
    return {"capacity": capacity, "runs": runs, "targets": targets(runs),
            "config": {"sweep": asdict(sweep), "trace": _per_run_sessions(trace_cfg),
                       "worker": asdict(worker_cfg), "step_model": step_model.to_json()},
            "calibration": _calibration_summary(calibration)}


def _per_run_sessions(trace_cfg: TraceConfig) -> dict[str, Any]:
    """The trace settings; its length is per run (sessions_per_worker x workers)."""
    return {k: v for k, v in asdict(trace_cfg).items() if k != "num_sessions"}


def _calibration_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: record[k] for k in ("engine", "speeds", "fit", "held_out", "machine")
            if k in record}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
