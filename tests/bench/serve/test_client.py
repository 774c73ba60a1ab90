"""One streamed request against the scripted fake server: parsing, usage, errors, and timings
consistent with the server's scripted delays (lower bounds only; no performance assertions)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from ember.bench.serve.client import (
    RequestResult,
    build_payload,
    fetch_first_model,
    send_request,
)
from tests.bench.serve.fake_openai import MODEL_ID, FakeOpenAIServer

TTFT_S, ITL_S = 0.05, 0.02


def _send(server: FakeOpenAIServer, endpoint: str, max_tokens: int,
          headers: dict[str, str] | None = None) -> RequestResult:
    if endpoint == "chat":
        path, content = "/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "hello there"}]}
    else:
        path, content = "/v1/completions", {"prompt": "hello there"}
    payload = build_payload(endpoint, MODEL_ID, max_tokens, ignore_eos=True, **content)

    async def go() -> RequestResult:
        async with aiohttp.ClientSession() as http:
            return await send_request(http, server.url + path, payload, headers or {},
                                      RequestResult(7), t0=0.0)

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_is_parsed_and_timed(endpoint: str) -> None:
    with FakeOpenAIServer(ttft_s=TTFT_S, itl_s=ITL_S) as server:
        r = _send(server, endpoint, max_tokens=5, headers={"x-test": "1"})
    assert r.success and r.status == 200 and r.error is None
    assert r.request_idx == 7
    assert r.text == "r0t0 r0t1 r0t2 r0t3 r0t4 "
    assert r.num_content_chunks == 5
    # the fake counts prompt words (and, for chat, each message's role)
    assert r.has_usage and r.prompt_tokens == (3 if endpoint == "chat" else 2)
    assert r.completion_tokens == 5
    assert r.cached_tokens == 0
    assert r.finish_reason == "length"
    # the chat role-only chunk arrives at once but carries no content: TTFT waits for text
    assert r.ttft_s >= TTFT_S
    assert len(r.itl_s) == 4
    # the last content chunk cannot arrive before the server's scripted time for it (one gap
    # alone may look short when the chunk before it was read late)
    assert r.ttft_s + sum(r.itl_s) >= TTFT_S + 4 * ITL_S
    assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-9
    assert r.e2e_s >= TTFT_S + 4 * ITL_S
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
    body = server.received[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5
    assert server.received[0].headers["x-test"] == "1"


def test_chunks_carrying_several_tokens_use_usage_for_tpot() -> None:
    with FakeOpenAIServer(ttft_s=TTFT_S, itl_s=ITL_S, tokens_per_chunk=4) as server:
        r = _send(server, "chat", max_tokens=12)
    assert r.num_content_chunks == 3 and len(r.itl_s) == 2
    assert r.completion_tokens == 12
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 11)


def test_without_usage_counts_content_chunks() -> None:
    with FakeOpenAIServer(ttft_s=0.0, itl_s=0.0, send_usage=False) as server:
        r = _send(server, "chat", max_tokens=6)
    assert r.success and not r.has_usage
    assert r.completion_tokens == 6 and r.prompt_tokens is None


@pytest.mark.parametrize("status", [400, 503])
def test_error_response_is_recorded_not_raised(status: int) -> None:
    with FakeOpenAIServer(error_at={0: status}) as server:
        r = _send(server, "chat", max_tokens=4)
    assert not r.success
    assert r.status == status
    assert r.error == f"scripted failure {status}"
    assert r.tpot_s is None and r.text == ""


def test_connection_refused_is_recorded() -> None:
    with FakeOpenAIServer() as server:
        url = server.url
    payload = build_payload("chat", MODEL_ID, 4, ignore_eos=False, messages=[])

    async def go() -> RequestResult:
        async with aiohttp.ClientSession() as http:
            return await send_request(http, url + "/v1/chat/completions", payload, {},
                                      RequestResult(0), t0=0.0)

    r = asyncio.run(go())
    assert not r.success and r.status is None and "Error" in r.error
    assert "ignore_eos" not in payload


def test_fetch_first_model() -> None:
    async def go(url: str) -> str:
        async with aiohttp.ClientSession() as http:
            return await fetch_first_model(http, url, {})

    with FakeOpenAIServer() as server:
        assert asyncio.run(go(server.url)) == MODEL_ID
        with pytest.raises(ValueError, match="HTTP 404"):
            asyncio.run(go(server.url + "/nothing"))
