"""Load 1.0: the saturated one-worker rate, with and without the system prompt cached."""

from __future__ import annotations

from ember.bench.fleet_sim.capacity import measure_capacity
from ember.bench.fleet_sim.config import TraceConfig, WorkerConfig
from ember.bench.fleet_sim.step_model import StepModel

MODEL = StepModel(0.005, 1e-4, 1e-8, 5e-4, 1e-7)
TRACE = TraceConfig(turns=4, system_prompt_len=256, input_len=24, output_len=8)


def test_caching_the_system_prompt_raises_capacity():
    capacity = measure_capacity(TRACE, WorkerConfig(kv_tokens=8192, max_num_seqs=8), MODEL,
                                num_requests=80)
    assert 0 < capacity["no_caching_requests_per_s"] < capacity["requests_per_s"]
    assert capacity["requests_per_s"] == capacity["system_prompt_cached_requests_per_s"]


def test_a_faster_engine_has_more_capacity():
    worker = WorkerConfig(kv_tokens=8192, max_num_seqs=8)
    slow = measure_capacity(TRACE, worker, MODEL, num_requests=80)["requests_per_s"]
    fast = measure_capacity(TRACE, worker, StepModel(0.0025, 5e-5, 5e-9, 2.5e-4, 5e-8),
                            num_requests=80)["requests_per_s"]
    assert abs(fast / slow - 2.0) < 1e-6  # every step takes half as long
