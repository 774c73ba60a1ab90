"""What "load" means: the request rate one worker sustains, measured by saturating one
simulated worker with the trace's turns, so a load of 0.8 offers 0.8 x that rate per worker.

Two capacities are measured: with no prefix caching at all, and with the shared system prompt
cached but no history (every request comes from a session the worker has not seen: what a
cache-blind router such as round-robin gets in a large fleet). Loads are fractions of the
second, the harder one to exceed; both are reported.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ember.bench.fleet_sim.config import TraceConfig, WorkerConfig
from ember.bench.fleet_sim.step_model import StepModel
from ember.bench.fleet_sim.worker import SimSequence, SimWorker
from ember.bench.fleet_sim.workload import CACHE_ROOT, Trace


def saturated_rate(trace_cfg: TraceConfig, worker_cfg: WorkerConfig, step_model: StepModel,
                   num_requests: int) -> float:
    """Requests per second one worker completes with a backlog that never empties: request i
    is turn i mod turns of session i, all queued at once; the rate is taken between the 20th
    and 80th percentile of completions, away from the start-up and the drain."""
    trace = Trace(replace(trace_cfg, num_sessions=num_requests))
    worker = SimWorker("capacity", worker_cfg, step_model, trace_cfg.block_size,
                       record_events=False)
    for idx in range(num_requests):
        session = trace.session(idx)
        turn_idx = idx % trace_cfg.turns
        worker.add(SimSequence(idx, session.prompt_lens[turn_idx],
                               session.turns[turn_idx].max_tokens, session.block_hashes,
                               CACHE_ROOT))
    now, done = 0.0, []
    while (duration := worker.start_step()) is not None:
        now += duration
        done += [now for event in worker.finish_step() if event.is_last]
    if len(done) != num_requests:
        raise RuntimeError(f"capacity run finished {len(done)} of {num_requests} requests")
    lo, hi = int(0.2 * num_requests), int(0.8 * num_requests)
    return (hi - lo) / (done[hi] - done[lo])


def measure_capacity(trace_cfg: TraceConfig, worker_cfg: WorkerConfig, step_model: StepModel,
                     num_requests: int) -> dict[str, Any]:
    """Per-worker capacity (requests/s) with caching off and with the system prompt cached;
    `requests_per_s` is the one loads are fractions of."""
    off = saturated_rate(trace_cfg, replace(worker_cfg, enable_prefix_caching=False),
                         step_model, num_requests)
    system = saturated_rate(trace_cfg, worker_cfg, step_model, num_requests)
    return {"requests_per_s": system, "no_caching_requests_per_s": off,
            "system_prompt_cached_requests_per_s": system, "num_requests": num_requests,
            "definition": "saturated one-worker rate, system prompt cached, no history"}
