"""GET /load: what a worker is doing now, in tokens (routers correct their counts by it)."""

from __future__ import annotations

import time

import httpx

from tests.server.conftest import MODEL_NAME


def _load(server) -> dict:
    resp = httpx.get(f"{server.url}/load", timeout=10)
    assert resp.status_code == 200
    return resp.json()


def _wait_for(server, predicate) -> dict:
    deadline = time.monotonic() + 20
    while not predicate(load := _load(server)):
        assert time.monotonic() < deadline, load
        time.sleep(0.05)
    return load


def test_load_reports_running_decode_tokens_and_returns_to_zero(server):
    _wait_for(server, lambda load: load["running"] == load["waiting"] == 0)
    body = {"model": MODEL_NAME, "prompt": "count with me", "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        load = _wait_for(server, lambda load: load["running"] == 1)
        assert 0 < load["decode_tokens"] < 900
        assert load["prefill_tokens"] == 0 and load["kv_usage"] > 0
    idle = _wait_for(server, lambda load: load["running"] == 0)
    assert idle["decode_tokens"] == idle["prefill_tokens"] == idle["waiting"] == 0
