"""One routing decision, independent of HTTP: session affinity (consistent hashing with
bounded loads) in front of a policy. The proxy and the fleet simulator both decide here."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from ember.router.affinity import AffinityRing
from ember.router.baselines import LeastRequestsPolicy, PrefixTreePolicy, RoundRobinPolicy
from ember.router.fleet import Worker
from ember.router.policy import CostPolicy, Decision, Policy, RoutingRequest

POLICIES = ("ember", "round_robin", "least_requests", "prefix_tree")


def make_policy(name: str, decode_weight: float = 0.25, seed: int | None = None) -> Policy:
    rng = random.Random(seed)
    if name == "ember":
        return CostPolicy(decode_weight, rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_requests":
        return LeastRequestsPolicy(rng)
    if name == "prefix_tree":
        return PrefixTreePolicy(rng=rng)
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(POLICIES)}")


@dataclass(frozen=True)
class Routed:
    decision: Decision
    session_move: bool | None  # None: no session or its first request


@dataclass
class Dispatcher:
    """Affinity gives a session's home worker (its first eligible worker on the ring, while that
    worker's running requests are within `affinity_load_factor` x the fleet mean); the policy
    decides with it."""

    policy: Policy
    session_affinity: bool = True
    affinity_load_factor: float = 1.25
    ring: AffinityRing = field(default_factory=AffinityRing)
    max_sessions: int = 1_000_000
    _session_workers: OrderedDict[str, str] = field(default_factory=OrderedDict)  # LRU

    def add_worker(self, url: str) -> None:
        self.ring.add(url)

    def remove_worker(self, url: str) -> None:
        self.ring.remove(url)

    def reconfigure(self, options: dict[str, float]) -> None:
        """Routing weights that change at run time (from a reloaded fleet file)."""
        if "affinity_load_factor" in options:
            self.affinity_load_factor = float(options["affinity_load_factor"])
        if "decode_weight" in options and hasattr(self.policy, "decode_weight"):
            self.policy.decode_weight = float(options["decode_weight"])

    def decide(self, req: RoutingRequest, workers: list[Worker],
               retry: bool = False) -> Routed | None:
        decision = self.policy.choose(req, workers, self._home(req, workers))
        if decision is None:
            return None
        if retry:
            decision = replace(decision, reason="retry")
        self.policy.routed(req, decision.worker)
        move = None
        if req.session_id is not None:
            previous = self._session_workers.get(req.session_id)
            move = None if previous is None else previous != decision.worker.url
            self._session_workers[req.session_id] = decision.worker.url
            self._session_workers.move_to_end(req.session_id)
            if len(self._session_workers) > self.max_sessions:
                self._session_workers.popitem(last=False)
        return Routed(decision, move)

    def _home(self, req: RoutingRequest, workers: list[Worker]) -> Worker | None:
        """The session's worker: the first eligible one on the ring, while its running
        requests are within the load bound; None when it is over it (the cost function then
        places the request, wherever its history is cached or the load is lowest)."""
        if req.session_id is None or not self.session_affinity:
            return None
        loads = {w.url: w.running for w in workers}
        eligible = {w.url for w in workers}
        first = self.ring.pick(req.session_id, loads, eligible, float("inf"))
        if first is None or self.ring.pick(req.session_id, loads, eligible,
                                           self.affinity_load_factor) != first:
            return None
        return next((w for w in workers if w.url == first), None)
