"""`ember router` in front of real `ember serve` workers on 127.0.0.1: proxying (streamed and
not), session stickiness, retry when a worker dies, join and leave at run time, and load
counters back at zero afterwards."""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ember.bench.serve import servers
from ember.router.affinity import AffinityRing
from tests.server.conftest import MODEL_NAME, ServerProcess, free_port, running_server

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8, "temperature": 0}


class RouterProcess(servers.ServerProcess):
    """`ember router` in front of `workers`, started and healthy (a worker answers)."""

    def __init__(self, *workers: str, flags: tuple[str, ...] = ()) -> None:
        argv = [sys.executable, "-m", "ember.cli", "router", "--health-interval-s", "0.5",
                "--breaker-s", "30", *flags]
        for worker in workers:
            argv += ["--worker", worker]
        log = Path(tempfile.mkdtemp(prefix="ember-router-")) / "router.log"
        super().__init__(servers.ServerLaunch("router", tuple(argv), start_timeout_s=60), log)
        self.wait_ready()

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/workers", timeout=10).json()["workers"]


@pytest.fixture(scope="module")
def fleet(model_dir):
    with running_server(model_dir) as a, running_server(model_dir) as b:
        router = RouterProcess(a.url, b.url)
        try:
            yield router, a, b
        finally:
            router.stop()


def _chat(router, headers=None, **changes):
    return httpx.post(f"{router.url}/v1/chat/completions", json={**CHAT, **changes},
                      headers=headers or {}, timeout=60)


def _assert_idle(router) -> None:
    deadline = time.monotonic() + 10
    while True:
        loads = [(w["prefill_tokens"], w["running"], w["decode_tokens"])
                 for w in router.workers()]
        if all(load == (0, 0, 0) for load in loads):
            return
        assert time.monotonic() < deadline, loads
        time.sleep(0.05)


def test_proxies_streamed_and_whole_responses(fleet):
    router, a, _ = fleet
    direct = httpx.post(f"{a.url}/v1/chat/completions", json=CHAT, timeout=60).json()
    whole = _chat(router)
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == \
        direct["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", timeout=60,
                      json={**CHAT, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    models = httpx.get(f"{router.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    bad = _chat(router, temperature=-1)  # the worker's 400 passes through, not retried
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    _assert_idle(router)


def test_sessions_stick_to_one_worker(fleet):
    router, _, _ = fleet
    for session in ("alpha", "beta", "gamma"):
        served = {_chat(router, {"x-session-affinity": session}).headers["x-ember-worker"]
                  for _ in range(4)}
        assert len(served) == 1, (session, served)
    spread = {_chat(router, {"x-session-affinity": f"s{i}"}).headers["x-ember-worker"]
              for i in range(12)}
    assert len(spread) == 2  # sessions use both workers
    _assert_idle(router)


def test_join_leave_and_a_killed_worker(model_dir):
    with running_server(model_dir) as a:
        router = RouterProcess(a.url)
        b = ServerProcess(model_dir)
        try:
            b.wait_ready()
            joined = httpx.post(f"{router.url}/workers", json={"url": b.url}, timeout=30)
            assert joined.status_code == 200 and joined.json()["healthy"]
            served = {_chat(router, {"x-session-affinity": f"j{i}"}).headers["x-ember-worker"]
                      for i in range(12)}
            assert served == {a.url, b.url}
            # a stream in flight on b when b dies ends with an error event, not a hang
            stream = httpx.stream("POST", f"{router.url}/v1/chat/completions", timeout=60,
                                  headers={"x-session-affinity": _session_on(router, b.url)},
                                  json={**CHAT, "stream": True, "max_tokens": 900,
                                        "ignore_eos": True})
            with stream as resp:
                assert resp.headers["x-ember-worker"] == b.url
                lines = resp.iter_lines()
                next(lines)
                b.proc.kill()
                rest = [line for line in lines if line.startswith("data: ")]
            assert '"error"' in rest[-2] and rest[-1] == "data: [DONE]"
            # requests not yet streaming are retried on the live worker and succeed
            results = [_chat(router, {"x-session-affinity": f"k{i}"}) for i in range(8)]
            assert all(r.status_code == 200 for r in results)
            assert {r.headers["x-ember-worker"] for r in results} == {a.url}
            left = httpx.request("DELETE", f"{router.url}/workers", params={"url": b.url},
                                 timeout=10)
            assert left.status_code == 200
            assert [w["url"] for w in router.workers()] == [a.url]
            _assert_idle(router)
        finally:
            router.stop()
            b.stop()


def _session_on(router, url: str) -> str:
    for i in range(100):
        session = f"probe{i}"
        if _chat(router, {"x-session-affinity": session}, max_tokens=1).headers[
                "x-ember-worker"] == url:
            return session
    raise AssertionError(f"no session maps to {url}")


class _BrokenWorker:
    """Healthy by /health, but every completion fails (503 or a dropped connection)."""

    def __init__(self, mode: str) -> None:
        import asyncio
        import threading

        from aiohttp import web

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.num_calls = 0

        async def health(_):
            return web.json_response({"status": "ok"})

        async def models(_):
            return web.json_response({"data": [{"id": MODEL_NAME}]})

        async def fail(request):
            self.num_calls += 1
            if mode == "503":
                return web.json_response({"error": {"message": "busy"}}, status=503)
            request.transport.close()  # drop the connection before any byte
            return web.Response()

        app = web.Application()
        app.add_routes([web.get("/health", health), web.get("/v1/models", models),
                        web.post("/v1/chat/completions", fail)])
        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_failures_before_the_first_byte_are_retried_elsewhere(fleet, mode):
    router, a, b = fleet
    broken = _BrokenWorker(mode)
    httpx.post(f"{router.url}/workers", json={"url": broken.url}, timeout=30).raise_for_status()
    try:
        results = [_chat(router, {"x-session-affinity": s})
                   for s in _sessions_homed_on(broken.url, (a.url, b.url, broken.url), mode)]
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert broken.num_calls > 0  # it was chosen, failed, and the request went elsewhere
        assert broken.url not in {r.headers["x-ember-worker"] for r in results}
        metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
        assert 'ember_router:decisions_total{reason="retry"}' in metrics
        _assert_idle(router)
    finally:
        httpx.request("DELETE", f"{router.url}/workers", params={"url": broken.url},
                      timeout=10)


def _sessions_homed_on(url: str, ring_urls: tuple[str, ...], prefix: str) -> list[str]:
    """Three sessions whose ring home is `url` (so it is surely tried), then six others."""
    ring = AffinityRing()
    for ring_url in ring_urls:
        ring.add(ring_url)
    names = (f"r{prefix}{i}" for i in range(10_000))
    return [s for s in names if ring.home(s) == url][:3] + [f"r{prefix}x{i}" for i in range(6)]


def test_load_the_router_did_not_send_is_counted(fleet):
    router, a, b = fleet
    body = {**CHAT, "stream": True, "max_tokens": 900, "ignore_eos": True}
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()  # held: a dropped iterator closes the stream
        next(lines)  # a client that bypasses the router keeps `a` busy
        deadline = time.monotonic() + 10
        while not (external := {w["url"]: w["external_decode_tokens"]
                                for w in router.workers()})[a.url]:
            assert time.monotonic() < deadline, external
            time.sleep(0.1)
        assert external[b.url] == 0
        with ThreadPoolExecutor(4) as pool:  # at once, while a surely still decodes
            served = {r.headers["x-ember-worker"] for r in pool.map(_chat, [router] * 4)}
        assert {w["url"]: w["external_decode_tokens"] for w in router.workers()}[a.url] > 0
        assert served == {b.url}  # the cost function sees a's decode load
    _assert_idle(router)


def test_a_draining_worker_finishes_its_streams_and_gets_no_new_requests(model_dir):
    import signal

    with running_server(model_dir) as a:
        b = ServerProcess(model_dir)
        b.wait_ready()
        router = RouterProcess(a.url, b.url)
        try:
            body = {**CHAT, "stream": True, "max_tokens": 600, "ignore_eos": True}
            headers = {"x-session-affinity": _session_on(router, b.url)}
            with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                              headers=headers, timeout=60) as resp:
                assert resp.headers["x-ember-worker"] == b.url
                lines = resp.iter_lines()
                next(lines)
                b.proc.send_signal(signal.SIGTERM)  # b drains: /health and new requests 503
                during = [_chat(router, headers) for _ in range(4)]
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and not any('"error"' in x for x in rest)
            assert all(r.status_code == 200 for r in during)
            assert {r.headers["x-ember-worker"] for r in during} == {a.url}
            assert b.proc.wait(timeout=30) == 0
            _assert_idle(router)
        finally:
            router.stop()
            b.stop()
