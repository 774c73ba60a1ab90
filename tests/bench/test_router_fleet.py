"""`ember bench router-fleet` end to end on a tiny fleet: two workers, one policy, a short
sessions trace; checks the report is whole and consistent (no timing assertions)."""

from __future__ import annotations

from ember.bench.router_fleet import (
    RouterFleetConfig,
    router_fleet_markdown,
    run_router_fleet_bench,
)
from tests.factories import tiny_model_dir


def test_a_tiny_fleet_run_is_reported(tmp_path):
    cfg = RouterFleetConfig(model_dir=str(tiny_model_dir(tmp_path)), num_workers=2,
                            policies=("ember",), sessions=3, turns=2, system_prompt_len=64,
                            input_len=16, output_len=4, rate=4.0, kv_cache_bytes=4 << 20,
                            affinity_load_factor=1000.0)  # no session moves for load
    report = run_router_fleet_bench(cfg)
    (run,) = report["runs"]
    assert run["num_requests"] == 6 and run["num_errors"] == 0
    assert 0 < run["hit_ratio"] <= run["oracle_hit_ratio"] + 0.05  # turn 2 repeats turn 1
    assert run["router"]["decisions_total[affinity]"] == 6
    assert run["router"]["affinity_hits_total"] == 3  # every second turn went home
    assert "| ember |" in router_fleet_markdown(report)
