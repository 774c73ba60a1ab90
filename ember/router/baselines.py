"""The policies ember is measured against, behind the same `Policy` interface as ember's own:
round-robin, least-requests, and a prefix tree with a balance threshold as SGLang's router
does it (its `cache_aware` policy, defaults as documented: cache threshold 0.3, balance
thresholds 64 requests absolute and 1.5x relative)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.router.fleet import Worker
from ember.router.kv_index import ApproxPrefixIndex
from ember.router.policy import Decision, RoutingRequest, decision


@dataclass
class RoundRobinPolicy:
    _counter: itertools.count = field(default_factory=itertools.count)

    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.url)
        return decision(ordered[next(self._counter) % len(ordered)], req, "load")

    def routed(self, req: RoutingRequest, worker: Worker) -> None:
        pass


@dataclass
class LeastRequestsPolicy:
    rng: random.Random = field(default_factory=random.Random)

    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None:
        if not workers:
            return None
        fewest = min(w.running for w in workers)
        return decision(self.rng.choice([w for w in workers if w.running == fewest]), req,
                        "load")

    def routed(self, req: RoutingRequest, worker: Worker) -> None:
        pass


@dataclass
class PrefixTreePolicy:
    """When the fleet is imbalanced (max - min running > abs and max > rel x min), the least
    loaded worker; otherwise the worker whose tree of routed prompts matches the most, if the
    match covers more than `cache_threshold` of the prompt, else the worker with the smallest
    tree. The tree holds what the router sent where, not what the workers cached."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_blocks: int = 100_000
    rng: random.Random = field(default_factory=random.Random)
    tree: ApproxPrefixIndex = field(init=False)

    def __post_init__(self) -> None:
        self.tree = ApproxPrefixIndex(self.max_tree_blocks)

    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None:
        if not workers:
            return None
        loads = [w.running for w in workers]
        if (max(loads) - min(loads) > self.balance_abs_threshold
                and max(loads) > self.balance_rel_threshold * min(loads)):
            return decision(self._pick(workers, lambda w: w.running), req, "load")
        matched = self.tree.prefix_match(list(req.block_hashes))
        match = {w.url: len(matched.get(w.url, ())) for w in workers}
        best = max(match.values())
        num_blocks = max(len(req.block_hashes), 1)
        if best > 0 and best / num_blocks > self.cache_threshold:
            return decision(self._pick(workers, lambda w: -match[w.url]), req, "cache")
        return decision(self._pick(workers, lambda w: self.tree.num_blocks(w.url)), req, "load")

    def routed(self, req: RoutingRequest, worker: Worker) -> None:
        if req.block_hashes:
            self.tree.record(worker.url, list(req.block_hashes))

    def _pick(self, workers: list[Worker], key: Callable[[Worker], float]) -> Worker:
        best = min(key(w) for w in workers)
        return self.rng.choice([w for w in workers if key(w) == best])
