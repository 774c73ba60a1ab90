"""Consistent hashing with bounded loads: sessions stick, spread, barely move when the fleet
changes, leave an overloaded or ineligible home and come back to it."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from ember.router.affinity import AffinityRing

WORKERS = ["w0", "w1", "w2"]
SESSIONS = [f"session-{i}" for i in range(3000)]
IDLE: dict[str, float] = {}


def ring_of(worker_ids: list[str], replicas: int = 100) -> AffinityRing:
    ring = AffinityRing(replicas)
    for worker_id in worker_ids:
        ring.add(worker_id)
    return ring


def test_same_session_same_worker_while_loads_are_even():
    ring = ring_of(WORKERS)
    even = {w: 7.0 for w in WORKERS}
    for session in SESSIONS[:50]:
        picks = {ring.pick(session, even, set(WORKERS)) for _ in range(5)}
        assert picks == {ring.home(session)}


def test_hashing_is_deterministic_across_processes():
    code = ("from ember.router.affinity import AffinityRing as R; r = R(); "
            "[r.add(w) for w in ('w0', 'w1', 'w2')]; "
            "print(','.join(r.home(f'session-{i}') for i in range(40)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    ring = ring_of(WORKERS)
    assert out == ",".join(ring.home(f"session-{i}") for i in range(40))


def test_sessions_spread_roughly_evenly():
    ring = ring_of(WORKERS)
    counts = Counter(ring.pick(s, IDLE, set(WORKERS)) for s in SESSIONS)
    assert set(counts) == set(WORKERS)
    for worker_id in WORKERS:
        assert 0.75 / 3 < counts[worker_id] / len(SESSIONS) < 1.25 / 3, counts


def test_adding_a_worker_moves_about_one_in_n_sessions_all_to_it():
    ring = ring_of(WORKERS)
    before = {s: ring.home(s) for s in SESSIONS}
    ring.add("w3")
    moved = [s for s in SESSIONS if ring.home(s) != before[s]]
    assert {ring.home(s) for s in moved} == {"w3"}
    assert 0.15 < len(moved) / len(SESSIONS) < 0.35


def test_removing_a_worker_moves_only_its_sessions():
    ring = ring_of([*WORKERS, "w3"])
    before = {s: ring.home(s) for s in SESSIONS}
    ring.remove("w1")
    moved = {s for s in SESSIONS if ring.home(s) != before[s]}
    assert moved == {s for s in SESSIONS if before[s] == "w1"}
    assert 0.15 < len(moved) / len(SESSIONS) < 0.35
    assert "w1" not in {ring.home(s) for s in SESSIONS}
    ring.add("w1")
    assert {s: ring.home(s) for s in SESSIONS} == before, "re-adding restores every home"


def test_overloaded_home_sends_the_session_to_the_next_worker_and_back():
    ring = ring_of(WORKERS)
    session = SESSIONS[0]
    home = ring.home(session)
    others = [w for w in WORKERS if w != home]
    # mean 40, bound 50: the home at 100 is over it
    overloaded = {home: 100.0, others[0]: 10.0, others[1]: 10.0}
    moved_to = ring.pick(session, overloaded, set(WORKERS))
    assert moved_to in others
    assert ring.pick(session, overloaded, set(WORKERS)) == moved_to, "the move is stable"
    # within the bound (mean 40, bound 50) the home keeps the session
    assert ring.pick(session, {home: 50.0, others[0]: 35.0, others[1]: 35.0},
                     set(WORKERS)) == home
    assert ring.pick(session, {w: 10.0 for w in WORKERS}, set(WORKERS)) == home


def test_moved_session_goes_to_the_next_worker_clockwise():
    ring = ring_of(WORKERS)
    for session in SESSIONS[:30]:
        home = ring.home(session)
        without_home = ring_of([w for w in WORKERS if w != home])
        # the ring with home removed names the next worker clockwise of the session
        next_worker = without_home.home(session)
        loads = {w: 0.0 for w in WORKERS} | {home: 100.0}
        assert ring.pick(session, loads, set(WORKERS)) == next_worker


def test_idle_fleet_rejects_no_one():
    ring = ring_of(WORKERS)
    session = SESSIONS[1]
    home = ring.home(session)
    # one request on the home, none elsewhere: mean 1/3, but the floor keeps the bound at 1.25
    assert ring.pick(session, {home: 1.0}, set(WORKERS)) == home
    assert ring.pick(session, {home: 2.0}, set(WORKERS)) != home


def test_ineligible_workers_are_skipped():
    ring = ring_of(WORKERS)
    session = SESSIONS[2]
    home = ring.home(session)
    eligible = set(WORKERS) - {home}
    picked = ring.pick(session, IDLE, eligible)
    assert picked in eligible
    assert picked == ring_of(sorted(eligible)).home(session)
    assert ring.pick(session, IDLE, set()) is None
    assert ring.pick(session, IDLE, {"not-on-the-ring"}) is None
    assert AffinityRing().pick(session, IDLE, {"w0"}) is None


def test_overloaded_ineligible_workers_do_not_inflate_the_mean():
    ring = ring_of(WORKERS)
    session = SESSIONS[3]
    home = ring.home(session)
    drained = next(w for w in WORKERS if w != home)
    # the draining worker's 1000 would lift the mean (and the bound) if it were counted
    loads = {home: 30.0, drained: 1000.0}
    assert ring.pick(session, loads, set(WORKERS) - {drained}) != home


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="replicas"):
        AffinityRing(0)
    with pytest.raises(ValueError, match="load_factor"):
        ring_of(WORKERS).pick("s", IDLE, set(WORKERS), load_factor=0.9)
