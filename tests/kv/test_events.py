"""KV events describe the true cache contents: replaying what the publisher sent (or the
recorder collected) after a random workload gives exactly what every tier holds."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch
import zmq

from ember import LLM, SamplingParams
from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.scheduler import Scheduler
from ember.kv.events import TOPIC, KVEventRecorder, apply_events
from ember.kv.tiers import KVTiers
from ember.model.demo import build_random_model
from tests.engine.test_scheduler import fake_run, make_request
from tests.kv.test_tier_invariants import BLOCK, FakeDevice
from tests.server.conftest import free_port


def _held(snapshot_tiers: dict[str, list[str]]) -> dict[str, set[str]]:
    return {tier: set(hashes) for tier, hashes in snapshot_tiers.items()}


def test_replayed_events_equal_every_tier_after_a_random_workload(tmp_path):
    events = KVEventRecorder()
    tiers = KVTiers((BLOCK,), torch.int64, cpu_bytes=6 * 32, disk_dir=tmp_path,
                    disk_bytes=40 * 64, events=events)
    kv = KVCacheManager(10, BLOCK, tiers=tiers)
    kv.pool.events = events
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), kv, 64)
    device, rng = FakeDevice(10, tiers), random.Random(5)
    replayed: dict[str, set[str]] = {}
    for i in range(400):
        if i % 3 == 0:
            scheduler.add_request(make_request(f"r{i}", rng.randrange(5, 30), 1, 3, rng,
                                               None if i % 4 == 0 else i % 3))
        sched = scheduler.schedule()
        device.execute(sched)
        scheduler.update(sched, fake_run(sched, rng))
        apply_events(replayed, events.drain())
    tiers.disk.flush()
    apply_events(replayed, events.drain())
    truth = _held(kv.snapshot())
    assert all(truth[t] for t in ("device", "cpu", "disk")), "the workload used every tier"
    assert {t: replayed.get(t, set()) for t in truth} == truth
    tiers.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", seed=4)


def test_published_batches_replay_to_the_snapshot(model_dir):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=12 * 8192,
              kv_cpu_bytes=8 * 8192, kv_events_endpoint=endpoint)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
    sub.setsockopt(zmq.RCVTIMEO, 2000)
    sub.connect(endpoint)
    _slow_joiner_handshake(llm, sub)
    start = llm.engine.kv_snapshot()  # what a router does on joining: snapshot, then batches
    replayed = _held(start["tiers"])
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(5, 1000, (int(n),), generator=gen).tolist()}
               for n in torch.randint(20, 70, (12,), generator=gen)]
    for prompt in prompts:
        llm.generate([prompt, prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    end = llm.engine.kv_snapshot()
    seqs = []
    while not seqs or seqs[-1] < end["seq"]:
        _, seq_bytes, payload = sub.recv_multipart()
        batch = msgpack.unpackb(payload, raw=False)
        assert int.from_bytes(seq_bytes, "big") == batch["seq"]
        if batch["seq"] > start["seq"]:
            seqs.append(batch["seq"])
            apply_events(replayed, batch["events"])
    assert seqs == list(range(start["seq"] + 1, end["seq"] + 1)), "numbered, with no gap"
    truth = _held(end["tiers"])
    assert truth["device"] and truth["cpu"]
    assert {t: replayed.get(t, set()) for t in truth} == truth
    llm.close()
    sub.close()


def _slow_joiner_handshake(llm: LLM, sub) -> None:
    """A SUB socket misses what is sent before it has joined: wait until it hears a batch,
    made by one request whose blocks then define the starting state. Each try's prompt starts
    with its own token: a repeated prompt would hit the cache and publish nothing new."""
    for attempt in range(50):
        prompt = [5 + attempt] + list(range(100, 134))
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1))
        try:
            sub.recv_multipart()
            return
        except zmq.Again:
            continue
    raise AssertionError("the subscriber never received a batch")
