"""Cache-aware routing with real workers publishing KV events: with no affinity header, a
conversation goes to the worker that already holds its prefix."""

from __future__ import annotations

import httpx

from tests.router.test_router import RouterProcess
from tests.server.conftest import MODEL_NAME, free_port, running_server, wait_until


def _conversation(topic: str) -> list[dict]:
    return [{"role": "system", "content": f"You answer questions about {topic}. " * 15},
            {"role": "user", "content": "first question"}]


def _chat(url: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": messages, "max_tokens": 4})


def test_requests_follow_the_cached_prefix(model_dir):
    events = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    with running_server(model_dir, "--kv-events-endpoint", events[0]) as a, \
            running_server(model_dir, "--kv-events-endpoint", events[1]) as b:
        router = RouterProcess(a.url, b.url, flags=("--model", str(model_dir)))
        try:
            homes = {"caches": a.url, "routers": b.url}
            for topic, url in homes.items():  # warm each worker directly
                assert _chat(url, _conversation(topic)).status_code == 200
            # the router's subscribers take the batches (or resync after a missed one)
            wait_until(lambda: all(w["indexed_blocks"] for w in router.workers()), 60)
            for _ in range(3):
                for topic, url in homes.items():
                    follow_up = _conversation(topic) + [
                        {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "and a follow-up"}]
                    resp = _chat(router.url, follow_up)
                    assert resp.status_code == 200
                    assert resp.headers["x-ember-worker"] == url, topic
                    cached = resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    assert cached > 0
                    assert resp.headers["x-ember-cached-tokens"] == str(cached)
            metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
            assert _value(metrics, 'ember_router:decisions_total{reason="cache"}') >= 6
            predicted = _value(metrics, "ember_router:predicted_cached_tokens_total")
            actual = _value(metrics, "ember_router:actual_cached_tokens_total")
            assert actual > 0 and 0.8 * actual <= predicted <= actual  # whole blocks only
        finally:
            router.stop()


def _value(metrics: str, name: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def test_without_events_follow_ups_go_where_the_router_sent_the_prefix(model_dir):
    with running_server(model_dir) as a, running_server(model_dir) as b:  # no KV events
        router = RouterProcess(a.url, b.url, flags=("--model", str(model_dir)))
        try:
            homes = {}
            for topic in ("caches", "routers", "kernels", "tokens"):
                resp = _chat(router.url, _conversation(topic))
                assert resp.status_code == 200
                homes[topic] = resp.headers["x-ember-worker"]
            for topic, url in homes.items():
                follow_up = _conversation(topic) + [
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "and a follow-up"}]
                resp = _chat(router.url, follow_up)
                assert resp.headers["x-ember-worker"] == url, topic
                assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        finally:
            router.stop()
