"""The oracle: the longest block-aligned prefix some earlier request computes."""

from __future__ import annotations

from ember.bench.fleet_sim.oracle import Oracle


def test_hand_computed_hits():
    oracle = Oracle(block_size=4)
    chain = [b"s0", b"s1", b"x2", b"x3", b"x4"]
    assert oracle.arrive(chain, 9, 4) == 0  # first request: computes 12 tokens, 3 blocks
    assert oracle.arrive(chain, 16, 1) == 12  # x3 was never computed
    assert oracle.arrive([b"s0", b"s1", b"y2"], 12, 1) == 8  # the shared head only
    assert oracle.arrive(chain[:2], 8, 1) == 7  # a full hit still computes one token
