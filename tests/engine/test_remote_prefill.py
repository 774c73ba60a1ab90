"""Decode-side reservations for disaggregated prefill: reserve, expire, release, adopt; blocks
always return to the pool."""

from __future__ import annotations

import random

import pytest

from ember.engine.remote_prefill import NoRoomError, RemotePrefills
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams
from tests.engine.test_scheduler import EOS, check_invariants, fake_run, make_scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _setup(num_blocks=16, max_num_seqs=8):
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, budget=64,
                               max_num_seqs=max_num_seqs)
    clock = Clock()
    return scheduler, RemotePrefills(scheduler, ttl_s=5.0, clock=clock), clock


def _request(prompt, n=1, max_tokens=4, request_id="r"):
    return Request(request_id, list(prompt), SamplingParams(n=n, max_tokens=max_tokens), 0.0,
                   eos_token_ids=(EOS,))


def test_reserve_then_adopt_decodes_from_the_first_token():
    scheduler, remote, _ = _setup()
    prompt = list(range(1, 11))  # 10 tokens: 3 blocks of 4
    reply = remote.reserve("t1", prompt)
    assert reply["first_block"] == 0 and len(reply["block_ids"]) == 3
    assert scheduler.kv.pool.num_used_blocks == 3
    updates = remote.adopt(_request(prompt), "t1", [42])
    assert [u.new_token_ids for u in updates] == [[42]] and not updates[0].finished
    seq = scheduler.requests["r"].leader
    assert seq.num_computed_tokens == 10 and seq.token_ids[-1] == 42
    rng = random.Random(0)
    while scheduler.has_unfinished:  # decodes continue from position 10
        sched = scheduler.schedule()
        assert all(c.start_pos >= 10 for c in sched.chunks)
        scheduler.update(sched, fake_run(sched, rng))
        check_invariants(scheduler)
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_cached_leading_blocks_are_not_sent_again():
    scheduler, remote, _ = _setup()
    prompt = list(range(1, 11))
    remote.reserve("a", prompt)
    remote.adopt(_request(prompt, max_tokens=1), "a", [7])
    assert not scheduler.has_unfinished  # max_tokens=1: done at the first token
    reply = remote.reserve("b", prompt + [11, 12, 13])
    assert reply["first_block"] == 2 and reply["num_cached_tokens"] == 8  # 2 full blocks
    remote.release("b")
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_no_room_expiry_and_release_free_every_block():
    scheduler, remote, clock = _setup(num_blocks=4)
    remote.reserve("big", list(range(1, 13)))  # 3 of 4 blocks
    with pytest.raises(NoRoomError, match="no free KV blocks"):
        remote.reserve("more", list(range(20, 30)))
    assert scheduler.kv.pool.num_used_blocks == 3
    clock.now = 6.0
    assert remote.expire() == ["big"]
    with pytest.raises(ValueError, match="expired or released"):
        remote.adopt(_request(list(range(1, 13))), "big", [5])
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks
    remote.reserve("again", list(range(1, 13)))
    assert remote.release("again") and not remote.release("again")
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks


def test_sequence_slots_bound_reservations():
    scheduler, remote, _ = _setup(max_num_seqs=2)
    remote.reserve("a", [1, 2, 3])
    remote.reserve("b", [4, 5, 6])
    with pytest.raises(NoRoomError, match="max_num_seqs"):
        remote.reserve("c", [7, 8, 9])


def test_adopt_checks_the_prompt_and_n():
    scheduler, remote, _ = _setup()
    remote.reserve("t", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="prompt differs"):
        remote.adopt(_request([1, 2, 3, 4, 6]), "t", [9])
    with pytest.raises(ValueError, match="2 first tokens for n=1"):
        remote.adopt(_request([1, 2, 3, 4, 5]), "t", [9, 9])
    with pytest.raises(ValueError, match="already reserved"):
        remote.reserve("t", [1])


def test_n_greater_than_one_forks_with_each_first_token():
    scheduler, remote, _ = _setup()
    prompt = list(range(1, 7))
    remote.reserve("t", prompt)
    updates = remote.adopt(_request(prompt, n=3), "t", [11, 12, 13])
    assert [u.seq.index for u in updates] == [0, 1, 2]
    assert [u.seq.token_ids[-1] for u in updates] == [11, 12, 13]
    rng = random.Random(1)
    while scheduler.has_unfinished:
        sched = scheduler.schedule()
        scheduler.update(sched, fake_run(sched, rng))
        check_invariants(scheduler)
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks
