"""Routing policies on hand-built workers: ember's cost function, the baselines, and the
dispatcher's session affinity in front of them."""

from __future__ import annotations

import random

import pytest

from ember.config import RouterConfig
from ember.router.baselines import LeastRequestsPolicy, PrefixTreePolicy, RoundRobinPolicy
from ember.router.fleet import Worker
from ember.router.policy import CostPolicy, RoutingRequest
from ember.router.routing import Dispatcher, make_policy


def _workers(n: int = 3) -> list[Worker]:
    return [Worker(f"http://w{i}", is_healthy=True) for i in range(n)]


def _req(**kw) -> RoutingRequest:
    return RoutingRequest(**{"num_prompt_tokens": 256, "max_tokens": 32, **kw})


def test_cost_prefers_the_cached_worker_until_its_load_outweighs_the_hit():
    a, b, c = _workers()
    req = _req(cached_tiers={a.url: ["device"] * 8})  # 128 of 256 tokens cached on a
    policy = CostPolicy(decode_weight=0.25, rng=random.Random(0))
    decision = policy.choose(req, [a, b, c])
    assert decision.worker is a and decision.reason == "cache"
    assert decision.predicted_cached_tokens == 128
    assert decision.cost == 128
    a.prefill_tokens = 200  # a's queue now costs more than recomputing the prefix elsewhere
    assert policy.choose(req, [a, b, c]).worker in (b, c)
    b.decode_tokens, c.decode_tokens = 200, 1000  # b: 256 + 50 < a: 128 + 200 < c: 256 + 250
    assert policy.choose(req, [a, b, c]).worker is b


def test_lower_tiers_save_less_and_one_token_is_always_computed():
    a, b = _workers(2)
    req = _req(num_prompt_tokens=64, cached_tiers={a.url: ["disk"] * 4, b.url: ["cpu"] * 4})
    assert req.cached_tokens(a.url) == pytest.approx(44.8)
    assert req.cached_tokens(b.url) == pytest.approx(57.6)
    assert CostPolicy(rng=random.Random(0)).choose(req, [a, b]).worker is b
    full = _req(num_prompt_tokens=64, cached_tiers={a.url: ["device"] * 4})
    assert full.cached_tokens(a.url) == 63


def test_ties_are_broken_at_random():
    policy = CostPolicy(rng=random.Random(0))
    workers = _workers(3)
    chosen = {policy.choose(_req(), workers).worker.url for _ in range(60)}
    assert chosen == {w.url for w in workers}


def test_round_robin_and_least_requests():
    workers = _workers(3)
    rr = RoundRobinPolicy()
    assert [rr.choose(_req(), workers).worker.url for _ in range(6)] == \
        [w.url for w in workers] * 2
    workers[0].running, workers[1].running, workers[2].running = 3, 1, 2
    assert LeastRequestsPolicy(random.Random(0)).choose(_req(), workers).worker is workers[1]


def test_prefix_tree_follows_its_tree_until_the_fleet_is_imbalanced():
    a, b = _workers(2)
    policy = PrefixTreePolicy(rng=random.Random(0))
    first = _req(block_hashes=("h1", "h2", "h3", "h4"))
    policy.routed(first, a)
    follow_up = _req(block_hashes=("h1", "h2", "h3", "h4", "h5"))
    decision = policy.choose(follow_up, [a, b])
    assert decision.worker is a and decision.reason == "cache"
    # a short match (1 of 5 blocks, under the 0.3 threshold): the smaller tree wins
    assert policy.choose(_req(block_hashes=("h1", "x2", "x3", "x4", "x5")), [a, b]).worker is b
    a.running, b.running = 100, 10  # 90 apart and 10x: balance beats the cache
    decision = policy.choose(follow_up, [a, b])
    assert decision.worker is b and decision.reason == "load"


def test_dispatcher_keeps_sessions_home_and_counts_moves():
    workers = _workers(3)
    dispatcher = Dispatcher(make_policy("ember", seed=0))
    for w in workers:
        dispatcher.add_worker(w.url)
    first = dispatcher.decide(_req(session_id="s1"), workers)
    assert first.session_move is None and first.decision.reason == "affinity"
    home = first.decision.worker
    again = dispatcher.decide(_req(session_id="s1"), workers)
    assert again.decision.worker is home and again.session_move is False
    home.running = 50  # far over 1.25x the mean: the session moves, and it is counted
    moved = dispatcher.decide(_req(session_id="s1"), workers)
    assert moved.decision.worker is not home and moved.session_move is True
    retry = dispatcher.decide(_req(), [w for w in workers if w is not home], retry=True)
    assert retry.decision.reason == "retry"


def test_without_affinity_sessions_follow_the_policy():
    workers = _workers(2)
    dispatcher = Dispatcher(make_policy("round_robin"), session_affinity=False)
    for w in workers:
        dispatcher.add_worker(w.url)
    served = {dispatcher.decide(_req(session_id="s"), workers).decision.worker.url
              for _ in range(4)}
    assert len(served) == 2


def test_unknown_policies_are_refused():
    with pytest.raises(ValueError, match="routing_policy must be one of"):
        RouterConfig(workers=("http://a",), routing_policy="fastest").validate()
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest")
