"""`ember up`: a prefill and a decode worker behind a router on the tiny model, started
together; a long prompt is prefilled remotely and streamed back; everything stops together."""

from __future__ import annotations

import os

import httpx
import psutil
import pytest

from ember.cpu_cores import available_cores, split_cores
from ember.launch.up import Fleet, FleetPlan, router_launch, worker_launch
from tests.factories import tiny_model_dir

FLAGS = ("--max-model-len", "1024", "--kv-cache-memory", str(4 << 20), "--num-threads", "1")


def test_a_disaggregated_fleet_serves_and_stops(tmp_path):
    plan = FleetPlan(str(tiny_model_dir(tmp_path)), "tiny", prefill=1, decode=1, port=0,
                     worker_args=FLAGS, log_dir=tmp_path / "logs")
    fleet = Fleet(plan)
    url = fleet.start()
    try:
        workers = httpx.get(f"{url}/workers", timeout=10).json()["workers"]
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        long_prompt = "tokens for the prefill worker " * 80
        resp = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": long_prompt, "max_tokens": 8, "stream": True})
        lines = [x for x in resp.text.splitlines() if x.startswith("data: ")]
        assert resp.status_code == 200 and lines[-1] == "data: [DONE]"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'ember_router:disagg_decisions_total{decision="remote"} 1.0' in metrics
    finally:
        fleet.stop()
    for proc in [fleet.router, *fleet.workers]:
        assert proc.alive_pids() == []


@pytest.mark.parametrize("counts, message", [
    ({"prefill": 1, "decode": 0}, "at least one prefill and one decode"),
    ({"prefill": 1, "decode": 1, "colocated": 2}, "either --workers"),
    ({}, "at least one worker"),
])
def test_bad_plans_are_refused(counts, message):
    with pytest.raises(ValueError, match=message):
        FleetPlan("model", "name", **counts).validate()


def test_prefill_and_router_options_reach_only_their_processes(tmp_path):
    plan = FleetPlan("model", "name", prefill=1, decode=1, log_dir=tmp_path,
                     worker_args=("--max-num-batched-tokens", "64"),
                     prefill_args=("--max-num-batched-tokens", "2048"),
                     router_args=("--min-remote-prefill-tokens", "0"))
    prefill, decode = worker_launch(plan, 0, "prefill").argv, worker_launch(plan, 1, "decode").argv
    # argparse keeps the last occurrence: the prefill worker's own budget wins
    assert "2048" in prefill and "2048" not in decode
    assert prefill.index("2048") > prefill.index("64")
    router = router_launch(plan, ["http://127.0.0.1:1"]).argv
    assert router[router.index("--min-remote-prefill-tokens") + 1] == "0"
    assert "--min-remote-prefill-tokens" not in prefill


def test_bound_workers_each_run_on_their_own_cores(tmp_path):
    plan = FleetPlan(str(tiny_model_dir(tmp_path)), "tiny", colocated=2, port=0,
                     worker_args=FLAGS[:4], bind_cores=True, log_dir=tmp_path / "logs")
    fleet = Fleet(plan)
    url = fleet.start()
    try:
        resp = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert resp.status_code == 200
        shares = []
        for worker in fleet.workers:
            procs = [psutil.Process(pid) for pid in worker.alive_pids()]
            masks = {tuple(sorted(p.cpu_affinity())) for p in procs}
            # the server and its engine core, every thread included, share the one mask
            threads = {tuple(sorted(os.sched_getaffinity(t.id))) for p in procs
                       for t in p.threads()}
            assert len(masks) == 1 and threads == masks
            shares.append(masks.pop())
        assert shares == split_cores(2)
        assert set(shares[0]).isdisjoint(shares[1])
    finally:
        fleet.stop()


def test_more_bound_workers_than_cores_are_refused():
    too_many = len(available_cores()) + 1
    with pytest.raises(ValueError, match=f"cannot give {too_many} workers a core each"):
        FleetPlan("model", "name", colocated=too_many, bind_cores=True).validate()
