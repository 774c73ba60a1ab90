"""Automatic prefix caching in the scheduler and KV manager: hits skip prefill, eviction is
least-recently-freed first (a sequence's tail before its head), hashes are deterministic."""

from __future__ import annotations

import random
import subprocess
import sys

from ember.config import SchedulerConfig
from ember.engine.block_hash import hash_block, root_hash
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler
from tests.engine.test_scheduler import EOS, check_invariants, fake_run

BLOCK = 4


def _scheduler(num_blocks=32, caching=True):
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=caching)
    return Scheduler(config, kv, 256)


def _request(rid, prompt, max_tokens=2, **params):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), 0.0,
                   eos_token_ids=(EOS,))


def _run_to_end(scheduler, rng=None):
    rng = rng or random.Random(0)
    chunks = []
    while scheduler.has_unfinished:
        sched = scheduler.schedule()
        chunks.extend(sched.chunks)
        scheduler.update(sched, fake_run(sched, rng))
        check_invariants(scheduler)
    return chunks


PROMPT = list(range(1, 22))  # 21 tokens: 5 full blocks and one token


def test_a_repeated_prompt_skips_its_cached_blocks():
    scheduler = _scheduler()
    first = _request("a", PROMPT)
    scheduler.add_request(first)
    _run_to_end(scheduler)
    assert first.num_cached_tokens == 0
    second = _request("b", PROMPT)
    scheduler.add_request(second)
    chunks = _run_to_end(scheduler)
    assert second.num_cached_tokens == 20
    assert (chunks[0].start_pos, chunks[0].num_tokens) == (20, 1)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    scheduler = _scheduler()
    prompt = PROMPT[:20]  # exactly 5 blocks
    first = _request("a", prompt, max_tokens=6)
    scheduler.add_request(first)
    scheduler.update(s := scheduler.schedule(), fake_run(s, random.Random(0)))  # a still runs
    second = _request("b", prompt)
    scheduler.add_request(second)
    sched = scheduler.schedule()
    (chunk_b,) = [c for c in sched.chunks if c.seq.request is second]
    assert (chunk_b.start_pos, chunk_b.num_tokens) == (19, 1)
    assert second.num_cached_tokens == 19
    table_a = scheduler.kv.block_tables[first.leader.seq_id]
    table_b = scheduler.kv.block_tables[chunk_b.seq.seq_id]
    assert table_b[:4] == table_a[:4]  # shared, read only
    assert sched.block_copies == [(table_a[4], table_b[4])]  # written into: copied first
    scheduler.update(sched, fake_run(sched, random.Random(1)))
    check_invariants(scheduler)
    _run_to_end(scheduler)


def test_shared_prefix_of_different_prompts_hits_whole_blocks_only():
    scheduler = _scheduler()
    scheduler.add_request(_request("a", PROMPT))
    _run_to_end(scheduler)
    other = _request("b", PROMPT[:10] + [99] * 11)  # shares 2 full blocks and 2 tokens
    scheduler.add_request(other)
    _run_to_end(scheduler)
    assert other.num_cached_tokens == 8


def test_eviction_takes_the_least_recently_freed_tail_first():
    scheduler = _scheduler(num_blocks=8)
    scheduler.add_request(_request("a", PROMPT[:16], max_tokens=1))  # 4 blocks, cached
    _run_to_end(scheduler)
    pool = scheduler.kv.pool
    assert pool.num_cached_blocks == 4 and pool.num_free_blocks == 8
    scheduler.add_request(_request("b", [50] * 22, max_tokens=1))  # needs 6 blocks: evicts 2
    _run_to_end(scheduler)
    again = _request("c", PROMPT[:16] + [7])
    scheduler.add_request(again)
    _run_to_end(scheduler)
    assert again.num_cached_tokens == 8  # a's first two blocks survived, its tail did not


def test_no_hits_when_disabled_or_when_prompt_logprobs_are_asked():
    scheduler = _scheduler(caching=False)
    for rid in ("a", "b"):
        request = _request(rid, PROMPT)
        scheduler.add_request(request)
        _run_to_end(scheduler)
        assert request.num_cached_tokens == 0
    scheduler = _scheduler()
    scheduler.add_request(_request("a", PROMPT))
    _run_to_end(scheduler)
    wants_logprobs = _request("b", PROMPT, prompt_logprobs=1)
    scheduler.add_request(wants_logprobs)
    chunks = _run_to_end(scheduler)
    assert wants_logprobs.num_cached_tokens == 0 and chunks[0].start_pos == 0


def test_block_hashes_are_chained_and_the_same_in_another_process():
    root = root_hash(b'{"model": 1}', "torch.float32")
    assert root != root_hash(b'{"model": 2}', "torch.float32")
    first = hash_block(root, [1, 2, 3, 4])
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(hash_block(root, [0, 2, 3, 4]),
                                                        [5, 6, 7, 8])
    code = ("from ember.engine.block_hash import hash_block, root_hash\n"
            "r = root_hash(b'{\"model\": 1}', 'torch.float32')\n"
            "print(hash_block(hash_block(r, [1, 2, 3, 4]), [5, 6, 7, 8]).hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", **_env()}).stdout.strip()
    assert out == hash_block(first, [5, 6, 7, 8]).hex()


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
