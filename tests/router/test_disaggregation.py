"""Disaggregated prefill and decode through `ember router`, with real processes: a prefill
worker and a decode worker (shared-memory KV transfer) against a colocated reference. Greedy
outputs are identical (fp32), prefix-cache hits on the prefill side included; a frozen or
killed prefill worker, and a decode worker with no room, still serve every request (the
decode worker prefills); both pools return to their baseline."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.router.test_router import RouterProcess, _assert_idle
from tests.server.conftest import MODEL_NAME, ServerProcess, running_server, wait_until

SYSTEM = "You are a careful assistant who answers in few words. " * 4
CHAT = {"model": MODEL_NAME, "max_tokens": 10, "temperature": 0, "ignore_eos": True}


def _chat(url: str, user: str, **changes) -> httpx.Response:
    body = {**CHAT, "messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": user}], **changes}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _counter(router, decision: str) -> float:
    text = httpx.get(f"{router.url}/metrics", timeout=10).text
    key = f'ember_router:disagg_decisions_total{{decision="{decision}"}}'
    return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(key)),
                0.0)


def _prefix_hits(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
               if x.startswith("ember:prefix_cache_hits_total"))


def _kv_usage(server) -> float:
    return httpx.get(f"{server.url}/load", timeout=10).json()["kv_usage"]


def _wait_serving(router, url: str) -> None:
    """Until the router sees `url` healthy with its breaker closed: a previous test's frozen
    worker may still be marked down when the next one starts."""
    wait_until(lambda: any(w["url"] == url and w["healthy"] and not w["breaker_open"]
                           for w in router.workers()))


def _wait_baseline(*servers) -> None:
    deadline = time.monotonic() + 10
    while any(_kv_usage(s) > 0 for s in servers):
        assert time.monotonic() < deadline, [_kv_usage(s) for s in servers]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(model_dir):
    flags = ("--kv-transfer-backend", "shm")
    prefill = ServerProcess(model_dir, "--role", "prefill", *flags)  # killed by a test
    with running_server(model_dir) as both, \
            running_server(model_dir, "--role", "decode", "--max-num-seqs", "3", *flags) \
            as decode:
        prefill.wait_ready()
        router = RouterProcess(decode.url, prefill.url, flags=(
            "--model", str(model_dir), "--min-remote-prefill-tokens", "1",
            "--prefill-timeout-s", "6"))
        try:
            _chat(router.url, "warm up")  # a fresh prefill worker's first request is slow
            yield router, both, prefill, decode
        finally:
            router.stop()
            prefill.stop()


def test_greedy_output_matches_colocated(fleet):
    router, both, prefill, decode = fleet
    remote, hits = _counter(router, "remote"), _prefix_hits(prefill)
    for user, n in (("first question", 1), ("second question", 2), ("first question", 1)):
        expected = _chat(both.url, user, n=n).json()
        got = _chat(router.url, user, n=n)
        assert got.status_code == 200, got.text
        assert got.headers["x-ember-worker"] == decode.url
        assert [c["message"]["content"] for c in got.json()["choices"]] == \
            [c["message"]["content"] for c in expected["choices"]]
    assert _counter(router, "remote") == remote + 3
    assert _prefix_hits(prefill) > hits  # the shared system prompt hit on the prefill side
    stream = httpx.post(f"{router.url}/v1/completions", timeout=60, json={
        **CHAT, "prompt": SYSTEM, "stream": True})
    lines = [x for x in stream.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    _wait_baseline(prefill, decode)
    _assert_idle(router)


def test_short_prompts_and_unsupported_requests_stay_local(fleet):
    router, both, _, decode = fleet
    local = _counter(router, "local_unsupported")
    resp = _chat(router.url, "why", logprobs=True, top_logprobs=2)
    assert resp.status_code == 200 and resp.json()["choices"][0]["logprobs"]
    assert _counter(router, "local_unsupported") == local + 1
    assert resp.headers["x-ember-worker"] == decode.url  # never the prefill-only worker


def test_a_decode_worker_without_room_prefills_itself(fleet):
    router, both, prefill, decode = fleet
    before = _counter(router, "local_no_room")
    holders = [threading.Thread(target=_chat, args=(router.url, f"hold {i}"),
                                kwargs={"max_tokens": 700}) for i in range(3)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 20
    while httpx.get(f"{decode.url}/load", timeout=10).json()["running"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resp = _chat(router.url, "no room for me")  # queued locally, served after the holders
    for t in holders:
        t.join()
    assert resp.status_code == 200
    assert _counter(router, "local_no_room") == before + 1
    _wait_baseline(prefill, decode)


def test_a_client_that_leaves_during_the_remote_prefill_frees_the_reservation(fleet):
    router, _, prefill, decode = fleet
    _wait_baseline(decode)
    _wait_serving(router, prefill.url)
    prefill.proc.send_signal(signal.SIGSTOP)  # the prefill hangs; the client gives up
    try:
        client = _send_raw_chat(router.url, "gone " * 40)
        wait_until(lambda: _kv_usage(decode) > 0)  # reserved while the prefill hangs
        client.close()
        _wait_baseline(decode)  # and freed well before the reservation's 30 s expiry
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
    _assert_idle(router)


def _send_raw_chat(url: str, user: str) -> socket.socket:
    """A chat request sent on a socket the caller closes when it wants to leave."""
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": user}]}).encode()
    address = urlparse(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (address.netloc.encode(), len(body), body))
    return sock


def test_a_frozen_then_killed_prefill_worker_costs_no_request(fleet):
    router, both, prefill, decode = fleet
    expected = _chat(both.url, "still there?").json()["choices"][0]["message"]["content"]
    failed = _counter(router, "local_prefill_failed")
    _wait_serving(router, prefill.url)
    prefill.proc.send_signal(signal.SIGSTOP)  # silent mid-request: the router times it out
    try:
        resp = _chat(router.url, "still there?")
    finally:
        prefill.proc.send_signal(signal.SIGCONT)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected
    assert _counter(router, "local_prefill_failed") == failed + 1
    prefill.proc.kill()
    prefill.proc.wait()
    for i in range(3):
        resp = _chat(router.url, f"after the kill {i}")
        assert resp.status_code == 200 and resp.headers["x-ember-worker"] == decode.url
    _wait_baseline(decode)
    _assert_idle(router)
