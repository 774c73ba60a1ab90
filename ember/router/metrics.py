"""Prometheus metrics of `ember router`: per-worker load in tokens, decisions by reason,
predicted and actual cached tokens, session-affinity hits and moves, retries and upstream errors."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.router.fleet import Fleet
from ember.router.routing import Routed


class _FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, attr in (
            ("ember_router:worker_prefill_tokens", "Uncached prompt tokens in flight.",
             "prefill_tokens"),
            ("ember_router:worker_running_requests", "Requests in flight.", "running"),
            ("ember_router:worker_decode_tokens", "Tokens still to generate.", "decode_tokens"),
            ("ember_router:worker_external_prefill_tokens",
             "Prompt tokens in flight that this router did not send (worker-reported).",
             "external_prefill_tokens"),
            ("ember_router:worker_external_decode_tokens",
             "Decode tokens to come that this router did not send (worker-reported).",
             "external_decode_tokens"),
            ("ember_router:worker_healthy", "1 when the worker takes requests.", "is_eligible"),
        ):
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            for worker in self.fleet.workers.values():
                family.add_metric([worker.url], float(getattr(worker, attr)))
            yield family


class RouterMetrics:
    def __init__(self, fleet: Fleet) -> None:
        self.registry = reg = CollectorRegistry()
        self._decisions = Counter("ember_router:decisions", "Routing decisions by reason.",
                                  ["reason"], registry=reg)
        self.predicted_cached_tokens = Counter(
            "ember_router:predicted_cached_tokens", "Prompt tokens predicted to hit a cache.",
            registry=reg)
        self.actual_cached_tokens = Counter(
            "ember_router:actual_cached_tokens",
            "Prompt tokens the workers reported as cache hits (x-ember-cached-tokens).",
            registry=reg)
        self.affinity_hits = Counter("ember_router:affinity_hits",
                                     "Session requests sent to the session's previous worker.",
                                     registry=reg)
        self.affinity_moves = Counter("ember_router:affinity_moves",
                                      "Session requests sent to another worker than before.",
                                      registry=reg)
        self.upstream_errors = Counter("ember_router:upstream_errors",
                                       "Worker failures by kind.", ["kind"], registry=reg)
        self._disagg = Counter("ember_router:disagg_decisions",
                               "Disaggregation decisions: remote prefill, or why local.",
                               ["decision"], registry=reg)
        reg.register(_FleetCollector(fleet))

    def decision(self, reason: str) -> None:
        self._decisions.labels(reason).inc()

    def routed(self, routed: Routed) -> None:
        self._decisions.labels(routed.decision.reason).inc()
        self.predicted_cached_tokens.inc(routed.decision.predicted_cached_tokens)
        if routed.session_move is True:
            self.affinity_moves.inc()
        elif routed.session_move is False:
            self.affinity_hits.inc()

    def disagg(self, decision: str) -> None:
        self._disagg.labels(decision).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
