"""Random workloads through the scheduler with CPU and disk tiers and a fake device that
stores token ids as its "KV": every computed position of every running sequence must hold
that sequence's token, whatever was evicted, saved, spilled, read back or copied."""

from __future__ import annotations

import random
import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.scheduler import Scheduler
from ember.kv.tiers import KVTiers
from tests.engine.test_scheduler import check_invariants, fake_run, make_request

BLOCK = 4


class FakeDevice:
    """The runner's data movement, on a [num_blocks, BLOCK] tensor of token ids."""

    def __init__(self, num_blocks: int, tiers: KVTiers) -> None:
        self.content = torch.full((num_blocks, BLOCK), -1, dtype=torch.int64)
        self.tiers = tiers

    def execute(self, sched) -> None:
        for block_id, block_hash in sched.kv_saves:
            self.tiers.save(block_hash, self.content[block_id].clone())
        for block_id, block_hash in sched.kv_loads:
            self.content[block_id] = self.tiers.load(block_hash)
        for src, dst in sched.block_copies:
            self.content[dst] = self.content[src]
        for chunk in sched.chunks:
            for pos, token in enumerate(chunk.token_ids, start=chunk.start_pos):
                self.content[chunk.block_ids[pos // BLOCK], pos % BLOCK] = token

    def check(self, scheduler: Scheduler) -> None:
        for seq in scheduler.running:
            table = scheduler.kv.block_tables[seq.seq_id]
            for pos in range(seq.num_computed_tokens):
                held = int(self.content[table[pos // BLOCK], pos % BLOCK])
                assert held == seq.token_ids[pos], f"seq {seq.seq_id} position {pos}"


OPS = st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort"]),
                         st.integers(2, 30), st.integers(1, 2), st.integers(1, 6),
                         st.integers(0, 10**6)), max_size=50)


@settings(max_examples=40, deadline=None)
@given(OPS, st.sampled_from([10, 16]), st.sampled_from([0, 6]))
def test_tiers_never_serve_wrong_kv(tmp_path_factory, ops, num_blocks, cpu_blocks):
    block_bytes = BLOCK * 8
    tiers = KVTiers((BLOCK,), torch.int64, cpu_bytes=cpu_blocks * block_bytes,
                    disk_dir=tmp_path_factory.mktemp("disk"), disk_bytes=200 * (block_bytes + 32))
    kv = KVCacheManager(num_blocks, BLOCK, tiers=tiers)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), kv, 64)
    device = FakeDevice(num_blocks, tiers)
    rng = random.Random(3)

    def step() -> None:
        sched = scheduler.schedule()
        device.execute(sched)
        scheduler.update(sched, fake_run(sched, rng))
        check_invariants(scheduler)
        device.check(scheduler)

    try:
        for i, (op, prompt_len, n, max_tokens, choice) in enumerate(ops):
            if op == "add":
                shared = None if choice % 4 == 0 else choice % 3
                scheduler.add_request(make_request(f"r{i}", prompt_len, n, max_tokens, rng,
                                                   shared))
            elif op == "step":
                step()
            elif scheduler.requests:
                victims = list(scheduler.requests)
                scheduler.abort_request(victims[choice % len(victims)])
        deadline = time.monotonic() + 30
        while scheduler.has_unfinished:  # drain, waiting for disk reads when needed
            assert time.monotonic() < deadline
            step()
        assert kv.pool.num_free_blocks == num_blocks
        assert not tiers.cpu._pinned, "a promised load was never taken"
    finally:
        tiers.close()
