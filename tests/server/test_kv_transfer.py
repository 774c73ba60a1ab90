"""Disaggregated serving over HTTP with real processes: a decode `ember serve` reserves
blocks, a prefill `ember serve` computes the prompt and writes its KV into them, the decode
worker continues; greedy output equals a colocated server's (fp32). Bad parameters are 400s
that name them, a full decode worker is a 503 no_room, and both pools end where they began."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, running_server, wait_until

CHAT = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "system", "content": "You are terse. " * 6},
                     {"role": "user", "content": "Count the blocks."}]}


# Short, to watch one expire; long enough for a whole hand-off on a busy machine.
RESERVATION_TTL_S = 10


@pytest.fixture(scope="module")
def trio(model_dir):
    flags = ("--kv-transfer-backend", "shm")
    with running_server(model_dir) as both, \
            running_server(model_dir, "--role", "prefill", *flags) as prefill, \
            running_server(model_dir, "--role", "decode", "--kv-reservation-ttl-s",
                           str(RESERVATION_TTL_S), *flags) as decode:
        yield both, prefill, decode


def _disaggregated(prefill, decode, body: dict, endpoint: str = "chat") -> httpx.Response:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    reserved = httpx.post(f"{decode.url}/kv_transfer/reserve", timeout=30,
                          json={"endpoint": endpoint, "request": body})
    assert reserved.status_code == 200, reserved.text
    r = reserved.json()
    first = httpx.post(f"{prefill.url}{path}", timeout=60, json={
        **body, "max_tokens": 1, "stream": False, "kv_transfer_params": {
            "do_remote_decode": True, "peer": r["peer"], "block_ids": r["block_ids"],
            "first_block": r["first_block"]}})
    assert first.status_code == 200, first.text
    first_ids = first.json()["kv_transfer_params"]["first_token_ids"]
    return httpx.post(f"{decode.url}{path}", timeout=60, json={
        **body, "kv_transfer_params": {"transfer_id": r["transfer_id"],
                                       "first_token_ids": first_ids}})


def _used_blocks(server) -> float:
    return httpx.get(f"{server.url}/load", timeout=10).json()["kv_usage"]


@pytest.mark.parametrize("n", [1, 2])
def test_greedy_output_matches_colocated(trio, n):
    both, prefill, decode = trio
    body = {**CHAT, "n": n}
    expected = httpx.post(f"{both.url}/v1/chat/completions", json=body, timeout=60).json()
    got = _disaggregated(prefill, decode, body)
    assert got.status_code == 200, got.text
    texts = [c["message"]["content"] for c in got.json()["choices"]]
    assert texts == [c["message"]["content"] for c in expected["choices"]]
    assert got.json()["usage"]["completion_tokens"] == 12 * n
    metrics = httpx.get(f"{prefill.url}/metrics", timeout=10).text
    values = {line.split(" ", 1)[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("ember:kv_transfer_")}
    assert values["ember:kv_transfer_bytes_total"] > 0
    assert values["ember:kv_transfer_segments_total"] >= 1
    assert values["ember:kv_transfer_connect_seconds_total"] > 0  # the pool was mapped once
    # the copies ran on a CPU for part of their wall time at most (preemption is the rest)
    assert 0 < values["ember:kv_transfer_cpu_seconds_total"] \
        <= values["ember:kv_transfer_seconds_total"] + 1e-3


def test_completions_stream_from_the_decode_worker(trio):
    both, prefill, decode = trio
    body = {"model": MODEL_NAME, "prompt": "one two three four five six seven eight nine",
            "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(f"{both.url}/v1/completions", json=body, timeout=60).json()
    got = _disaggregated(prefill, decode, body, endpoint="completions")
    assert got.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    assert got.json()["choices"][0]["text"]
    assert _used_blocks(prefill) == 0 and _used_blocks(decode) == 0


def test_errors_name_the_problem(trio):
    both, prefill, decode = trio
    bad = httpx.post(f"{decode.url}/v1/chat/completions", timeout=30, json={
        **CHAT, "kv_transfer_params": {"transfer_id": "nope", "first_token_ids": [1]}})
    assert bad.status_code == 400 and "expired or released" in bad.json()["error"]["message"]
    bad = httpx.post(f"{prefill.url}/v1/chat/completions", timeout=30, json={
        **CHAT, "kv_transfer_params": {"do_remote_decode": True}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_transfer_params"
    bad = httpx.post(f"{both.url}/kv_transfer/reserve", timeout=30,
                     json={"endpoint": "chat", "request": CHAT})
    assert bad.status_code == 400 and "'decode' worker reserves" in bad.json()["error"]["message"]
    bad = httpx.post(f"{decode.url}/kv_transfer/reserve", timeout=30,
                     json={"endpoint": "chat", "request": {"model": MODEL_NAME}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request"
    huge = {**CHAT, "messages": [{"role": "user", "content": "word " * 2000}]}
    bad = httpx.post(f"{decode.url}/kv_transfer/reserve", timeout=30,
                     json={"endpoint": "chat", "request": huge})
    assert bad.status_code == 400 and "context" in bad.json()["error"]["message"]


def test_a_released_reservation_frees_its_blocks(trio):
    _, _, decode = trio
    reserved = httpx.post(f"{decode.url}/kv_transfer/reserve", timeout=30,
                          json={"endpoint": "chat", "request": CHAT}).json()
    assert _used_blocks(decode) > 0
    released = httpx.delete(f"{decode.url}/kv_transfer/reserve/{reserved['transfer_id']}",
                            timeout=10)
    assert released.status_code == 200
    assert _used_blocks(decode) == 0


def test_an_expired_reservation_is_freed_and_never_adopted(trio):
    _, prefill, decode = trio
    r = httpx.post(f"{decode.url}/kv_transfer/reserve", timeout=30,
                   json={"endpoint": "chat", "request": CHAT}).json()
    assert _used_blocks(decode) > 0
    time.sleep(RESERVATION_TTL_S)
    wait_until(lambda: _used_blocks(decode) == 0)  # freed by the decode worker on its own
    late = httpx.post(f"{prefill.url}/v1/chat/completions", timeout=60, json={
        **CHAT, "max_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "peer": r["peer"], "block_ids": r["block_ids"],
            "first_block": r["first_block"], "expires_at_unix": r["expires_at_unix"]}})
    assert late.status_code == 500 and "expired" in late.json()["error"]["message"]
    adopt = httpx.post(f"{decode.url}/v1/chat/completions", timeout=30, json={
        **CHAT, "kv_transfer_params": {"transfer_id": r["transfer_id"],
                                       "first_token_ids": [5]}})
    assert adopt.status_code == 400 and "expired or released" in adopt.text
    assert _used_blocks(prefill) == 0 and _used_blocks(decode) == 0
