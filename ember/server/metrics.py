"""Prometheus metrics of one `ember serve` worker, with vLLM's metric names under `ember:`.

Latency histograms and token counters are observed by the front end per request; running,
waiting, KV usage and preemptions are read from the engine core's stats at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.engine.messages import EngineCoreStats

disable_created_metrics()  # `*_created` series only add noise to every scrape

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)


class _EngineStatsCollector(Collector):
    """Engine-side values, from the last stats snapshot taken before each scrape."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = EngineCoreStats()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s, labels = self.stats, [self.model_name]
        for name, doc, value in (
            ("ember:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("ember:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("ember:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
             s.kv_usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        for name, doc, value in (
            ("ember:num_preemptions", "Sequences preempted.", s.num_preemptions),
            ("ember:kv_transfer_bytes", "KV bytes this prefill worker wrote to decode workers.",
             s.kv_transfer_bytes),
            ("ember:kv_transfer_seconds", "Seconds spent writing KV to decode workers.",
             s.kv_transfer_seconds),
            ("ember:kv_transfer_cpu_seconds",
             "CPU seconds of the threads that ran those writes (for shm, the copies "
             "themselves); below kv_transfer_seconds by the time the writer was preempted.",
             s.kv_transfer_cpu_seconds),
            ("ember:kv_transfer_wait_seconds",
             "Seconds the engine loop waited for KV writes after its forwards (the part of "
             "the writes that did not overlap compute).", s.kv_transfer_wait_seconds),
            ("ember:kv_transfer_segments", "Contiguous pieces those KV writes were made of.",
             s.kv_transfer_segments),
            ("ember:kv_transfer_connect_seconds",
             "Seconds of one-time set-up (pool mapping, handshake) per decode worker.",
             s.kv_transfer_connect_seconds),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter


class ServerMetrics:
    """One registry per server (tests run several in one process)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry
        self.ttft = Histogram("ember:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("ember:inter_token_latency_seconds", "Time between output tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("ember:e2e_request_latency_seconds", "Request latency, end to end.",
                             labels, buckets=_E2E_BUCKETS, registry=reg).labels(model_name)
        self.prompt_tokens = Counter("ember:prompt_tokens", "Prefill tokens processed.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter("ember:generation_tokens", "Tokens generated.",
                                         labels, registry=reg).labels(model_name)
        self._success = Counter("ember:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=reg)
        self.prefix_cache_queries = Counter(
            "ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels,
            registry=reg).labels(model_name)
        self.prefix_cache_hits = Counter(
            "ember:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels,
            registry=reg).labels(model_name)
        self.engine = _EngineStatsCollector(model_name)
        reg.register(self.engine)

    def observe_finished(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def render(self, stats: EngineCoreStats | None) -> bytes:
        if stats is not None:
            self.engine.stats = stats
        return generate_latest(self.registry)
