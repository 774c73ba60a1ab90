"""The simulated fleet end to end on a small trace: every request completes and the router's
load counters return to zero, affinity keeps sessions home, ember's policy finds the history
that round-robin scatters, and a seed fixes the whole run."""

from __future__ import annotations

import pytest

from ember.bench.fleet_sim.config import POLICY_SPECS, TraceConfig, WorkerConfig
from ember.bench.fleet_sim.report import session_moves, summarize
from ember.bench.fleet_sim.sim import FleetSim
from ember.bench.fleet_sim.step_model import StepModel
from ember.bench.fleet_sim.workload import Trace

MODEL = StepModel(0.005, 1e-4, 1e-8, 5e-4, 1e-7)
TRACE = TraceConfig(num_sessions=16, turns=4, system_prompt_len=128, input_len=24,
                    output_len=8, think_time_s=0.5)
WORKER = WorkerConfig(kv_tokens=4096, max_num_seqs=8, max_num_batched_tokens=256)


def _run(policy: str, sessions_per_s: float = 4.0, num_workers: int = 4):
    return FleetSim(Trace(TRACE), policy, num_workers, sessions_per_s, WORKER, MODEL).run()


@pytest.mark.parametrize("policy", list(POLICY_SPECS))
def test_every_request_completes_and_load_counters_return_to_zero(policy):
    result = _run(policy)
    assert len(result.records) == TRACE.num_sessions * TRACE.turns
    assert all(r.finish_s is not None and r.first_token_s is not None for r in result.records)
    assert result.counters_at_end == {"prefill_tokens": 0, "decode_tokens": 0, "running": 0,
                                      "in_flight": 0}
    summary = summarize(result)
    assert 0.0 < summary["hit_ratio"] <= summary["oracle_hit_ratio"] < 1.0
    assert len(result.itl_s) == sum(r.num_output_tokens - 1 for r in result.records)


def test_ember_finds_the_history_round_robin_scatters():
    ember = summarize(_run("ember_no_header"))
    round_robin = summarize(_run("round_robin"))
    assert ember["hit_ratio"] > round_robin["hit_ratio"] + 0.1
    assert ember["of_oracle"] > 0.95


def test_affinity_keeps_each_session_on_one_worker_when_none_is_overloaded():
    result = _run("ember_header", sessions_per_s=0.05)  # sessions hardly overlap
    assert session_moves(result) == result.affinity_moves == 0
    assert session_moves(_run("round_robin", sessions_per_s=0.05)) > 0


def test_under_a_burst_overloaded_homes_shed_sessions_and_each_move_is_counted():
    result = _run("ember_header", sessions_per_s=200.0)
    assert result.affinity_moves == session_moves(result) > 0


def test_router_view_matches_the_workers_caches_at_low_load():
    result = _run("ember_no_header", sessions_per_s=0.05)
    assert all(r.predicted_cached_tokens == r.num_cached_tokens for r in result.records)


def test_same_seed_same_results():
    for policy in ("ember_header", "prefix_tree", "least_requests"):
        assert summarize(_run(policy)) == summarize(_run(policy))
