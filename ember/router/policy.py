"""Where a request runs. Every policy answers `choose(request, eligible workers, home)`; ember's
own is one cost function over the eligible workers:

cost(w) = prefill tokens w would compute for this request (prompt minus tier-weighted cached
          prefix) + prefill tokens already in flight on w + decode_weight x decode tokens
          still to come on w.

In-flight tokens are the router's own count, corrected by what the worker reports (fleet.py).

Lowest cost wins, ties broken at random. `home` is the session's worker under affinity (see
routing.py); ember's policy sends the request there, the baselines (baselines.py) ignore it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from ember.router.fleet import Worker

# How much of a cached block a tier saves: device blocks are free, lower tiers cost a copy.
TIER_WEIGHTS = {"device": 1.0, "cpu": 0.9, "disk": 0.7}


@dataclass(frozen=True)
class RoutingRequest:
    num_prompt_tokens: int
    max_tokens: int
    session_id: str | None = None
    cached_tiers: dict[str, list[str]] = field(default_factory=dict)  # worker -> tier per block
    block_hashes: tuple[str, ...] = ()  # the prompt's full blocks, as the workers hash them
    block_size: int = 16

    def cached_tokens(self, worker_url: str, weighted: bool = True) -> float:
        """Prompt tokens `worker_url` holds in cache (tier-weighted unless told otherwise);
        at least one token is always computed."""
        tiers = self.cached_tiers.get(worker_url, [])
        blocks = sum(w * tiers.count(t) for t, w in TIER_WEIGHTS.items()) if weighted \
            else len(tiers)  # list.count: C speed, this runs for every worker per request
        return min(blocks * self.block_size, max(self.num_prompt_tokens - 1, 0))


@dataclass(frozen=True)
class Decision:
    worker: Worker
    reason: str  # "affinity" | "cache" | "load"
    predicted_cached_tokens: int
    cost: float = 0.0


class Policy(Protocol):
    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None: ...

    def routed(self, req: RoutingRequest, worker: Worker) -> None:
        """Bookkeeping once a request is sent (e.g. an approximate tree of what went where)."""


def decision(worker: Worker, req: RoutingRequest, reason: str, cost: float = 0.0) -> Decision:
    return Decision(worker, reason, int(req.cached_tokens(worker.url, weighted=False)), cost)


@dataclass
class CostPolicy:
    """ember's policy (see the module docstring)."""

    decode_weight: float = 0.25
    rng: random.Random = field(default_factory=random.Random)

    def cost(self, req: RoutingRequest, worker: Worker) -> float:
        new_prefill = req.num_prompt_tokens - req.cached_tokens(worker.url)
        return (new_prefill + worker.load_prefill_tokens
                + self.decode_weight * worker.load_decode_tokens)

    def choose(self, req: RoutingRequest, workers: list[Worker],
               home: Worker | None = None) -> Decision | None:
        if not workers:
            return None
        if home is not None and home in workers:
            return decision(home, req, "affinity", self.cost(req, home))
        costs = [(self.cost(req, w), w) for w in workers]
        best = min(c for c, _ in costs)
        worker = self.rng.choice([w for c, w in costs if c == best])
        reason = "cache" if req.cached_tokens(worker.url) > 0 else "load"
        return decision(worker, req, reason, best)

    def routed(self, req: RoutingRequest, worker: Worker) -> None:
        pass
