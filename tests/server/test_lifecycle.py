"""The worker's life: 503 while loading and draining, disconnects that free KV blocks at once,
a SIGTERM drain that lets streams finish and exits 0, a dead engine, a wrong model directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from starlette.testclient import TestClient

from ember.config import EngineConfig, ServerConfig
from ember.server.app import build_app
from ember.server.metrics import ServerMetrics
from ember.server.state import ServerState
from tests.server.conftest import (
    MODEL_NAME,
    ServerProcess,
    kv_usage,
    running_server,
    wait_until,
)

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LONG = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 400, "ignore_eos": True}


def test_503_while_loading_and_draining(model_dir):
    state = ServerState(ServerConfig(), MODEL_NAME, ServerMetrics(MODEL_NAME))
    app = build_app(state, EngineConfig.from_options(str(model_dir)))
    http = TestClient(app)  # no lifespan: the engine never starts, as while loading
    for method, path, body in (("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", CHAT)):
        resp = http.request(method, path, json=body)
        assert resp.status_code == 503, resp.text
        assert "loading" in resp.json()["error"]["message"]
        assert resp.headers["retry-after"] == "5"
    state.startup_error = "out of memory"
    assert "out of memory" in http.get("/health").json()["error"]["message"]
    state.is_draining = True
    assert "shutting down" in http.post("/v1/chat/completions", json=CHAT).json()["error"][
        "message"]
    assert http.get("/metrics").status_code == 200  # scrapes work whatever the state


def test_openapi_schema_is_served(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
            "/metrics"} <= set(schema["paths"])


def test_stream_disconnect_frees_blocks_at_once(server):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions",
                         json={**LONG, "max_tokens": 1000, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
            assert kv_usage(server)[0] == 1.0  # running, holding blocks
        # leaving the block closed the connection
    wait_until(lambda: kv_usage(server) == (0.0, 0.0), timeout_s=5)


def test_non_stream_disconnect_frees_blocks(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 1000},
                   timeout=httpx.Timeout(10, read=0.3))
    wait_until(lambda: kv_usage(server) == (0.0, 0.0), timeout_s=5)


def test_sigterm_lets_streams_finish_then_exits_zero(model_dir):
    server = ServerProcess(model_dir)
    try:
        server.wait_ready()
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{server.url}/v1/completions",
                json={**LONG, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _refuses_new_requests(server), timeout_s=10)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def _refuses_new_requests(server: ServerProcess) -> bool:
    try:
        resp = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=5)
    except httpx.TransportError:
        return True  # the listening socket is closed
    return resp.status_code == 503


def test_dead_engine_gives_503_not_a_hang(model_dir):
    with running_server(model_dir) as server:
        (core,) = [c for c in psutil.Process(server.proc.pid).children()
                   if "resource_tracker" not in " ".join(c.cmdline())]
        core.kill()
        wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 503)
        resp = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=10)
        assert resp.status_code == 503
        assert "not running" in resp.json()["error"]["message"]


def test_wrong_model_directory_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "serve", "--model",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
