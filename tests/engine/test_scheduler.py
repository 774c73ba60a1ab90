"""Scheduler + KV block invariants under random add / step / fork / abort / finish sequences."""

from __future__ import annotations

import collections
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.request import FinishReason, Request, SequenceStatus
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.scheduler_output import RunnerOutput, SampledToken

EOS = 0


def make_scheduler(num_blocks=32, block_size=4, max_num_seqs=8, budget=16, chunked=True,
                   max_model_len=128):
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size), max_model_len)


SHARED_PREFIXES = [[random.Random(k).randrange(1, 50) for _ in range(40)] for k in range(3)]


def make_request(request_id, prompt_len, n=1, max_tokens=8, rng=None, shared=None):
    """A random prompt, or (shared=k) the first prompt_len tokens of shared prefix k with a
    random last token, so prompts share cached blocks."""
    rng = rng or random.Random(0)
    if shared is None:
        prompt = [rng.randrange(1, 50) for _ in range(prompt_len)]
    else:
        prompt = SHARED_PREFIXES[shared][: prompt_len - 1] + [rng.randrange(1, 50)]
    params = SamplingParams(n=n, max_tokens=max_tokens)
    return Request(request_id, prompt, params, 0.0, eos_token_ids=(EOS,))


def fake_run(sched, rng, eos_prob=0.0):
    sampled = {}
    for chunk in sched.chunks:
        for seq in chunk.sample_seqs:
            token = EOS if rng.random() < eos_prob else rng.randrange(1, 50)
            sampled[seq.seq_id] = SampledToken(token)
    return RunnerOutput(sampled)


def check_invariants(scheduler: Scheduler) -> None:
    kv = scheduler.kv
    pool = kv.pool
    holders = collections.Counter(b for table in kv.block_tables.values() for b in table)
    for block_id in range(pool.num_blocks):
        assert pool.ref_count(block_id) == holders.get(block_id, 0), f"block {block_id}"
    free = list(pool._free)
    assert len(free) == len(set(free)), "a block is free twice"
    assert all(pool.ref_count(b) == 0 for b in free)
    assert pool.num_free_blocks + len(holders) == pool.num_blocks, "leaked block"
    live = {seq.seq_id for req in scheduler.requests.values() for seq in req.sequences
            if seq.status in (SequenceStatus.RUNNING, SequenceStatus.WAITING)}
    assert set(k for k, t in kv.block_tables.items() if t) <= live, "finished seq holds blocks"
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(kv.block_tables.get(seq.seq_id, [])) * kv.block_size >= seq.num_computed_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING
    check_prefix_cache(scheduler)


def check_prefix_cache(scheduler: Scheduler) -> None:
    """The hash map and the blocks agree, and no sequence reads a cached block that holds
    other tokens than its own prefix."""
    kv, pool = scheduler.kv, scheduler.kv.pool
    for block_hash, block_id in pool._cached.items():
        assert pool.block_hash(block_id) == block_hash
    assert sum(h is not None for h in pool._hash_of) == len(pool._cached)
    for seq in scheduler.running:
        table = kv.block_tables.get(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // kv.block_size, len(table))
        hashes = kv.block_hashes(seq, num_full)
        for i in range(num_full):
            assert pool.block_hash(table[i]) in (None, hashes[i]), f"seq {seq.seq_id} block {i}"


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "step", "step", "step", "abort", "finish"]),
        st.integers(1, 40),  # prompt length
        st.integers(1, 3),  # n
        st.integers(1, 12),  # max_tokens
        st.integers(0, 10**6),  # choice
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(OPS, st.booleans(), st.sampled_from([8, 13, 40]))
def test_random_workloads_keep_block_invariants(ops, chunked, num_blocks):
    scheduler = make_scheduler(num_blocks=num_blocks, chunked=chunked, budget=16 if chunked else 48)
    rng = random.Random(1)
    next_id = 0
    for op, prompt_len, n, max_tokens, choice in ops:
        if op == "add":
            try:
                shared = None if choice % 3 == 0 else choice % 3
                scheduler.add_request(make_request(f"r{next_id}", prompt_len, n, max_tokens, rng,
                                                   shared))
            except ValueError:
                pass  # too long for this cache: refused up front
            next_id += 1
        elif op == "step":
            sched = scheduler.schedule()
            check_invariants(scheduler)
            scheduler.update(sched, fake_run(sched, rng, eos_prob=0.05))
        elif op in ("abort", "finish") and scheduler.requests:
            request = list(scheduler.requests.values())[choice % len(scheduler.requests)]
            if op == "abort":
                scheduler.abort_request(request.request_id)
            else:
                seq = request.sequences[choice % len(request.sequences)]
                scheduler.finish_sequence(seq, FinishReason.STOP, "stop")
        check_invariants(scheduler)
    for _ in range(2000):  # drain: everything finishes, nothing is left behind
        if not scheduler.has_unfinished:
            break
        sched = scheduler.schedule()
        scheduler.update(sched, fake_run(sched, rng))
        check_invariants(scheduler)
    assert not scheduler.has_unfinished
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_chunked_prefill_keeps_decodes_flowing():
    scheduler = make_scheduler(num_blocks=64, budget=8, max_model_len=256)
    scheduler.add_request(make_request("short", 3, max_tokens=50))
    sched = scheduler.schedule()
    scheduler.update(sched, fake_run(sched, random.Random(0)))
    scheduler.add_request(make_request("long", 60, max_tokens=5))
    for _ in range(8):
        sched = scheduler.schedule()
        by_id = {c.seq.request.request_id: c for c in sched.chunks}
        assert by_id["short"].num_tokens == 1  # the decode runs every step
        assert sched.num_batched_tokens <= 8
        if "long" in by_id:
            assert by_id["long"].num_tokens <= 7
        scheduler.update(sched, fake_run(sched, random.Random(0)))


def test_fcfs_admission_and_max_num_seqs():
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2, budget=64)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 5))
    sched = scheduler.schedule()
    assert [c.seq.request.request_id for c in sched.chunks] == ["r0", "r1"]


def test_out_of_blocks_preempts_newest_and_recomputes():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64, max_model_len=64)
    scheduler.add_request(make_request("old", 8, max_tokens=12))
    scheduler.add_request(make_request("new", 8, max_tokens=12))
    rng = random.Random(0)
    preempted = False
    for _ in range(60):
        if not scheduler.has_unfinished:
            break
        sched = scheduler.schedule()
        check_invariants(scheduler)
        if scheduler.num_preemptions and not preempted:
            preempted = True
            victim = scheduler.waiting[0]
            assert victim.request.request_id == "new"
            assert victim.num_computed_tokens == 0 and victim.num_output_tokens > 0
        scheduler.update(sched, fake_run(sched, rng))
    assert preempted
    assert not scheduler.has_unfinished
    assert scheduler.kv.pool.num_free_blocks == 6


def test_n_greater_than_one_shares_prompt_blocks_with_copy_on_write():
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=64)
    scheduler.add_request(make_request("r", 10, n=3, max_tokens=4))
    sched = scheduler.schedule()
    assert [len(c.sample_seqs) for c in sched.chunks] == [3]
    scheduler.update(sched, fake_run(sched, random.Random(0)))
    tables = [scheduler.kv.block_tables[s.seq_id] for s in scheduler.requests["r"].sequences]
    assert tables[0] == tables[1] == tables[2]  # shared after the fork
    assert scheduler.kv.pool.num_used_blocks == 3
    sched = scheduler.schedule()
    # Position 10 lies in the shared third block: two of the three copy it before writing.
    assert len(sched.block_copies) == 2
    tables = [scheduler.kv.block_tables[s.seq_id] for s in scheduler.requests["r"].sequences]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    check_invariants(scheduler)


def test_abort_frees_blocks_at_once():
    scheduler = make_scheduler(num_blocks=32)
    scheduler.add_request(make_request("r", 30, n=2))
    sched = scheduler.schedule()
    scheduler.update(sched, fake_run(sched, random.Random(0)))
    assert scheduler.kv.pool.num_used_blocks > 0
    scheduler.abort_request("r")
    assert scheduler.kv.pool.num_used_blocks == 0
    assert not scheduler.has_unfinished


def test_finished_ids_wait_for_a_step_that_runs():
    """The runner and the KV sender drop a sequence's state when its id reaches them: an empty
    step (no forward) must not swallow the ids of sequences that finished before it."""
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 6))
    sched = scheduler.schedule()
    scheduler.update(sched, fake_run(sched, random.Random(0)))
    (seq,) = scheduler.requests["r"].sequences
    scheduler.abort_request("r")
    assert scheduler.schedule().finished_seq_ids == []  # idle: nothing runs
    scheduler.add_request(make_request("s", 6))
    assert scheduler.schedule().finished_seq_ids == [seq.seq_id]


def test_prompt_too_long_is_refused_with_clear_error():
    scheduler = make_scheduler(max_model_len=16)
    try:
        scheduler.add_request(make_request("r", 16))
    except ValueError as err:
        assert "max_model_len" in str(err)
    else:
        raise AssertionError("a prompt filling the whole context was accepted")


def test_pending_tokens_count_uncomputed_prompts_and_decodes_still_to_come():
    scheduler = make_scheduler(num_blocks=32, block_size=4, budget=16)
    scheduler.add_request(make_request("a", 30, n=2, max_tokens=5))
    scheduler.add_request(make_request("b", 6, max_tokens=3))
    assert scheduler.pending_tokens() == (36, 2 * 5 + 3)  # the fork shares a's prompt
    sched = scheduler.schedule()  # 16 of a's 30 prompt tokens
    scheduler.update(sched, fake_run(sched, random.Random(0)))
    assert scheduler.pending_tokens() == (20, 13)
    rng = random.Random(0)
    while scheduler.has_unfinished:
        sched = scheduler.schedule()
        scheduler.update(sched, fake_run(sched, rng))
        prefill, decode = scheduler.pending_tokens()
        assert prefill >= 0 and decode >= 0
    assert scheduler.pending_tokens() == (0, 0)
