"""The router's KV index: leading-run prefix matches with tiers, per-worker snapshots and gap
detection; the approximate index of what was routed where; and a subscriber following a real
ZeroMQ publisher to exactly what `apply_events` replays."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from ember.engine.block_hash import extend_block_hashes, root_hash
from ember.engine.setup import model_cache_root
from ember.kv.events import TIERS, KVEventPublisher, KVEventRecorder, apply_events
from ember.router.kv_index import (
    ApproxPrefixIndex,
    KVEventSubscriber,
    KVIndex,
    http_snapshot_fetcher,
)
from tests.server.conftest import MODEL_NAME, free_port, running_server

BLOCK_SIZE = 16


def block_hashes(token_ids: list[int]) -> list[str]:
    hashes: list[bytes] = []
    extend_block_hashes(hashes, root_hash("tiny", "float32"), token_ids, BLOCK_SIZE,
                        len(token_ids) // BLOCK_SIZE)
    return [h.hex() for h in hashes]


H = block_hashes(list(range(10 * BLOCK_SIZE)))  # one conversation's 10 blocks


def snapshot(seq: int = 0, **tiers: list[str]) -> dict[str, Any]:
    return {"seq": seq, "endpoint": None, "block_size": BLOCK_SIZE,
            "tiers": {tier: tiers.get(tier, []) for tier in TIERS}}


def batch(seq: int, *events: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {"seq": seq, "ts": 0.0, "events": [
        {"type": kind, "block_hashes": hashes, "tier": tier,
         **({"parent_hash": None} if kind == "stored" else {})}
        for kind, tier, hashes in events]}


# ---- KVIndex ---------------------------------------------------------------------------------

def test_prefix_match_is_the_leading_run_each_worker_holds():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=H[:3]))
    index.apply_snapshot("w2", snapshot(device=[H[0], H[2], H[3]]))  # lacks H[1]
    index.apply_snapshot("w3", snapshot(device=H[1:5]))  # lacks the first block
    assert index.prefix_match(H[:5]) == {"w1": ["device"] * 3, "w2": ["device"]}
    assert index.prefix_match(H[1:4]) == {"w3": ["device"] * 3, "w1": ["device"] * 2}
    assert index.prefix_match([]) == {}
    assert index.prefix_match(block_hashes(list(range(1, 33)))) == {}


def test_prefix_match_reports_the_fastest_tier_of_each_block():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=[H[0]], cpu=[H[0], H[1]], disk=[H[1], H[2]]))
    assert index.prefix_match(H[:4]) == {"w1": ["device", "cpu", "disk"]}
    assert index.apply_batch("w1", batch(1, ("removed", "device", [H[0]]),
                                         ("stored", "device", [H[2]])))
    assert index.prefix_match(H[:4]) == {"w1": ["cpu", "cpu", "device"]}
    assert index.apply_batch("w1", batch(2, ("removed", "cpu", [H[1]])))
    assert index.prefix_match(H[:4]) == {"w1": ["cpu", "disk", "device"]}
    assert index.apply_batch("w1", batch(3, ("removed", "disk", [H[1]])))
    assert index.prefix_match(H[:4]) == {"w1": ["cpu"]}
    assert index.blocks("w1") == {"device": {H[2]}, "cpu": {H[0]}, "disk": {H[2]}}


def test_removing_a_block_another_tier_never_held_changes_nothing():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=H[:2]))
    assert index.apply_batch("w1", batch(1, ("removed", "disk", H[:2] + [H[5]])))
    assert index.prefix_match(H[:2]) == {"w1": ["device", "device"]}


def test_snapshot_replaces_only_that_workers_entries():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=H[:4]))
    index.apply_snapshot("w2", snapshot(device=H[:2]))
    index.apply_snapshot("w1", snapshot(seq=9, cpu=H[:1]))
    assert index.prefix_match(H[:4]) == {"w1": ["cpu"], "w2": ["device", "device"]}
    assert index.last_seq("w1") == 9
    assert index.num_blocks("w1") == 1


def test_remove_worker_forgets_it_entirely():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=H[:4]))
    index.apply_snapshot("w2", snapshot(device=H[:2]))
    index.remove_worker("w1")
    index.remove_worker("never-seen")
    assert index.prefix_match(H[:4]) == {"w2": ["device", "device"]}
    assert index.num_blocks("w1") == 0 and index.last_seq("w1") is None
    assert not index.apply_batch("w1", batch(1, ("stored", "device", [H[0]]))), "no snapshot"
    index.remove_worker("w2")
    assert len(index) == 0, "no empty entries are left behind"


def test_batches_must_follow_the_snapshot_without_a_gap():
    index = KVIndex()
    assert not index.apply_batch("w1", batch(1)), "a batch before any snapshot means resync"
    index.apply_snapshot("w1", snapshot(seq=5, device=[H[0]]))
    # batches already in the snapshot (queued while it was fetched) are skipped, not applied
    assert index.apply_batch("w1", batch(4, ("removed", "device", [H[0]])))
    assert index.apply_batch("w1", batch(5, ("removed", "device", [H[0]])))
    assert index.prefix_match(H[:1]) == {"w1": ["device"]}
    assert index.apply_batch("w1", batch(6, ("stored", "device", [H[1]])))
    assert index.last_seq("w1") == 6
    assert not index.apply_batch("w1", batch(8, ("stored", "device", [H[2]]))), "7 is missing"
    assert index.prefix_match(H[:3]) == {"w1": ["device", "device"]}, "nothing applied"
    assert not index.apply_batch("w1", batch(1, ("stored", "device", [H[2]]))), "a restart"
    assert index.apply_batch("w1", batch(7, ("stored", "device", [H[2]])))
    assert index.prefix_match(H[:3]) == {"w1": ["device"] * 3}


def naive_prefix_match(held: dict[str, dict[str, str]], hashes: list[str]):
    runs = {}
    for worker_id, blocks in held.items():
        run = []
        for h in hashes:
            if h not in blocks:
                break
            run.append(blocks[h])
        if run:
            runs[worker_id] = run
    return runs


def test_prefix_match_equals_a_per_worker_scan_on_random_fleets():
    rng = random.Random(3)
    conversations = [block_hashes([rng.randrange(50_000) for _ in range(250 * BLOCK_SIZE)])
                     for _ in range(4)]
    for _ in range(20):
        index, truth = KVIndex(), {}
        for w in range(8):
            held = {}
            for conversation in rng.sample(conversations, 2):
                start, end = sorted(rng.sample(range(251), 2))
                for h in conversation[start:end]:
                    held[h] = rng.choice(TIERS)
            truth[f"w{w}"] = held
            index.apply_snapshot(f"w{w}", {"seq": 0, "tiers": {
                tier: [h for h, t in held.items() if t == tier] for tier in TIERS}})
        for conversation in conversations:
            assert index.prefix_match(conversation) == naive_prefix_match(truth, conversation)


# ---- ApproxPrefixIndex -----------------------------------------------------------------------

def test_approx_index_matches_what_was_routed_where():
    index = ApproxPrefixIndex()
    index.record("w1", H[:4])
    index.record("w2", H[:2] + block_hashes(list(range(1, 3 * BLOCK_SIZE + 1)))[2:])
    assert index.prefix_match(H[:6]) == {"w1": ["device"] * 4, "w2": ["device"] * 2}
    index.remove_worker("w1")
    assert index.prefix_match(H[:6]) == {"w2": ["device"] * 2}
    assert index.num_blocks("w1") == 0


def test_approx_index_evicts_least_recent_tails_before_heads():
    index = ApproxPrefixIndex(max_blocks=4)
    other = block_hashes(list(range(1, 2 * BLOCK_SIZE + 1)))
    index.record("w1", H[:3])
    index.record("w1", other)
    assert index.num_blocks("w1") == 4
    assert index.prefix_match(H[:3]) == {"w1": ["device"] * 2}, "the tail went first"
    assert index.prefix_match(other) == {"w1": ["device"] * 2}
    index.record("w1", H[:2])  # refreshed: now the other conversation is the oldest
    index.record("w1", [H[5]])
    assert index.prefix_match(other) == {"w1": ["device"]}
    assert index.prefix_match(H[:2]) == {"w1": ["device"] * 2}


def test_approx_index_rejects_a_zero_bound():
    with pytest.raises(ValueError, match="max_blocks"):
        ApproxPrefixIndex(max_blocks=0)


# ---- KVEventSubscriber against a real publisher ----------------------------------------------

async def wait_until(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _slow_joiner_handshake(worker: FakeWorker, is_caught_up: Callable[[], bool]) -> None:
    """A SUB socket misses what is sent before it has joined: send single batches until one
    is heard (one that arrives after a lost one is a gap, and resyncs)."""
    for _ in range(300):
        worker.random_events(5)
        worker.flush()
        await asyncio.sleep(0.05)
        if is_caught_up():
            return
    raise AssertionError("the subscriber never heard the publisher")


class FakeWorker:
    """A publisher and recorder, and the truth a real worker's snapshot would return."""

    def __init__(self) -> None:
        self.recorder = KVEventRecorder()
        self.mirror = KVEventRecorder()  # the same events, for the truth
        self.publisher = KVEventPublisher(f"tcp://127.0.0.1:{free_port()}", self.recorder)
        self.truth: dict[str, set[str]] = {tier: set() for tier in TIERS}
        self.rng = random.Random(11)
        self.num_fetches = 0

    async def fetch_snapshot(self) -> dict[str, Any]:
        self.num_fetches += 1
        return {"seq": self.publisher.seq, "endpoint": self.publisher.endpoint,
                "block_size": BLOCK_SIZE,
                "tiers": {tier: sorted(held) for tier, held in self.truth.items()}}

    def random_events(self, num_events: int) -> None:
        for _ in range(num_events):
            tier, h = self.rng.choice(TIERS), bytes.fromhex(self.rng.choice(H))
            is_stored = self.rng.random() < 0.6
            for recorder in (self.recorder, self.mirror):
                if is_stored:
                    recorder.stored(h, None, tier)
                else:
                    recorder.removed(h, tier)

    def flush(self, is_lost: bool = False) -> None:
        """Send one batch (or, when is_lost, number it but never send it) and track truth."""
        apply_events(self.truth, self.mirror.drain())
        if is_lost:
            self.recorder.drain()
            self.publisher.seq += 1
        else:
            self.publisher.flush()


def test_subscriber_follows_a_real_publisher_through_gaps_to_the_replayed_state():
    worker = FakeWorker()
    index = KVIndex()
    index.apply_snapshot("other", snapshot(device=H[:2]))

    def caught_up() -> bool:
        return (index.last_seq("w1") == worker.publisher.seq
                and index.blocks("w1") == worker.truth)

    async def main() -> KVEventSubscriber:
        worker.random_events(20)
        worker.flush()  # before anyone listens: only the snapshot carries it
        sub = KVEventSubscriber("w1", worker.publisher.endpoint, index, worker.fetch_snapshot,
                                idle_resync_s=60.0)
        task = asyncio.create_task(sub.run())
        await wait_until(lambda: sub.num_resyncs >= 1)
        await _slow_joiner_handshake(worker, caught_up)
        for i in range(30):
            worker.random_events(5)
            worker.flush()
            await asyncio.sleep(0)
            if i % 10 == 9:  # once the publisher is heard, every batch must arrive in order
                await wait_until(caught_up)
        resyncs = sub.num_resyncs
        worker.random_events(5)
        worker.flush(is_lost=True)
        worker.random_events(5)
        worker.flush()
        await wait_until(caught_up)
        assert sub.num_resyncs == resyncs + 1, "the gap was noticed and resynced"
        sub.close()
        await asyncio.wait_for(task, 5.0)
        return sub

    sub = asyncio.run(main())
    worker.publisher.close()
    assert sub.num_batches > 0
    assert index.blocks("w1") == worker.truth
    assert index.prefix_match(H[:2])["other"] == ["device", "device"], "others untouched"


def test_subscriber_survives_a_dead_worker_and_stops_on_close():
    index = KVIndex()
    index.apply_snapshot("w1", snapshot(device=H[:3]))
    calls = []

    async def fetch() -> dict[str, Any]:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("worker down")
        return snapshot(seq=0, cpu=H[:1])

    async def main() -> None:
        endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody publishes there
        sub = KVEventSubscriber("w1", endpoint, index, fetch, backoff_s=0.01)
        task = asyncio.create_task(sub.run())
        await wait_until(lambda: len(calls) >= 1)
        assert index.num_blocks("w1") == 0, "a failed snapshot drops the stale entries"
        await wait_until(lambda: sub.num_resyncs == 1)
        assert index.prefix_match(H[:3]) == {"w1": ["cpu"]}
        sub.close()
        await asyncio.wait_for(task, 5.0)

    asyncio.run(main())


def test_subscriber_resyncs_after_idle_silence():
    worker = FakeWorker()

    async def main() -> None:
        index = KVIndex()
        sub = KVEventSubscriber("w1", worker.publisher.endpoint, index, worker.fetch_snapshot,
                                idle_resync_s=0.05)
        task = asyncio.create_task(sub.run())
        await wait_until(lambda: sub.num_resyncs >= 1)
        worker.random_events(10)
        worker.flush(is_lost=True)  # a lost last batch: no later batch reveals the gap
        await wait_until(lambda: index.blocks("w1") == worker.truth)
        sub.close()
        await asyncio.wait_for(task, 5.0)

    asyncio.run(main())
    worker.publisher.close()


# ---- against a real `ember serve` ------------------------------------------------------------

def test_subscriber_indexes_a_real_workers_cache_under_the_routers_own_hashes(tmp_path):
    import httpx
    import torch

    from tests.factories import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    prompts = [[5 + (i * 7 + j) % 900 for j in range(100 + 20 * i)] for i in range(3)]
    root = model_cache_root(str(model_dir), torch.float32)

    def router_hashes(token_ids: list[int]) -> list[str]:
        hashes: list[bytes] = []
        extend_block_hashes(hashes, root, token_ids, 16, len(token_ids) // 16)
        return [h.hex() for h in hashes]

    with running_server(model_dir, "--kv-events-endpoint", endpoint) as server:
        index = KVIndex()

        async def main() -> None:
            sub = KVEventSubscriber("w1", endpoint, index, http_snapshot_fetcher(server.url))
            task = asyncio.create_task(sub.run())
            await wait_until(lambda: sub.num_resyncs >= 1, timeout_s=30)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                for ids in prompts:
                    resp = await client.post("/v1/completions", json={
                        "model": MODEL_NAME, "prompt": ids, "max_tokens": 2})
                    resp.raise_for_status()
            for ids in prompts:  # events, not another snapshot, bring these in
                hashes = router_hashes(ids)
                await wait_until(lambda h=hashes: len(index.prefix_match(h).get("w1", []))
                                 == len(h), timeout_s=30)
            assert sub.num_batches > 0
            snap = await http_snapshot_fetcher(server.url)()
            await wait_until(lambda: index.last_seq("w1") >= snap["seq"], timeout_s=30)
            assert index.blocks("w1") == {t: set(snap["tiers"][t]) for t in TIERS}
            sub.close()
            await asyncio.wait_for(task, 5.0)

        asyncio.run(main())
