"""Where a request runs: one cost function over the eligible workers, plus session affinity.

cost(w) = prefill tokens w would compute for this request (prompt minus tier-weighted cached
          prefix) + prefill tokens already in flight on w + decode_weight x decode tokens
          still to come on w.
Lowest cost wins, ties broken at random. A request with `x-session-affinity` goes to its
session's home worker (consistent hashing with bounded loads) while that worker is eligible
and within the load bound; otherwise the cost decides and the move is counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ember.router.fleet import Worker

# How much of a cached block a tier saves: device blocks are free, lower tiers cost a copy.
TIER_WEIGHTS = {"device": 1.0, "cpu": 0.9, "disk": 0.7}


@dataclass(frozen=True)
class RoutingRequest:
    num_prompt_tokens: int
    max_tokens: int
    session_id: str | None = None
    cached_tiers: dict[str, list[str]] = field(default_factory=dict)  # worker -> tier per block


@dataclass(frozen=True)
class Decision:
    worker: Worker
    reason: str  # "affinity" | "cache" | "load"
    predicted_cached_tokens: int
    cost: float


@dataclass
class RoutingPolicy:
    block_size: int = 16
    decode_weight: float = 0.25
    rng: random.Random = field(default_factory=random.Random)

    def cached_tokens(self, req: RoutingRequest, worker: Worker) -> float:
        tiers = req.cached_tiers.get(worker.url, [])
        weighted = sum(TIER_WEIGHTS.get(t, 0.0) for t in tiers) * self.block_size
        return min(weighted, max(req.num_prompt_tokens - 1, 0))

    def cost(self, req: RoutingRequest, worker: Worker) -> float:
        new_prefill = req.num_prompt_tokens - self.cached_tokens(req, worker)
        return new_prefill + worker.prefill_tokens + self.decode_weight * worker.decode_tokens

    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None:
        if not workers:
            return None
        if home is not None and home in workers:
            return Decision(home, "affinity", int(self.cached_tokens(req, home)),
                            self.cost(req, home))
        costs = [(self.cost(req, w), w) for w in workers]
        best = min(c for c, _ in costs)
        worker = self.rng.choice([w for c, w in costs if c == best])
        cached = int(self.cached_tokens(req, worker))
        return Decision(worker, "cache" if cached > 0 else "load", cached, best)
