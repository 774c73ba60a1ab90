"""A scripted OpenAI-compatible streaming server for the bench tests (aiohttp.web, 127.0.0.1).

Runs in a thread with its own event loop; streams deterministic chunks after known delays and
records every request (path, headers, body, server-side start and end times).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL_ID = "fake-model"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    start: float  # time.perf_counter() when the handler began
    end: float | None = None  # just before [DONE] (or the error body) is written
    answer: str = ""  # the content streamed back


def _words(body: dict[str, Any]) -> list[str]:
    if "prompt" in body:
        return body["prompt"].split()
    words = []
    for msg in body["messages"]:
        words += [msg["role"]] + (msg.get("content") or "").split()
        for call in msg.get("tool_calls", ()):
            words.append(call["id"])
    return words


@dataclass
class FakeOpenAIServer:
    """Request `idx` gets `max_tokens` tokens (`tokens_per_chunk` per content chunk) as
    "r{idx}t0 r{idx}t1 ...", after a role-only chunk, `ttft_s` before the first and `itl_s`
    between chunks.
    Usage counts prompt words; cached tokens are the longest word prefix shared with an
    earlier request. `error_at` maps arrival index -> HTTP status to fail with."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    send_usage: bool = True
    error_at: dict[int, int] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    port: int = 0

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL_ID}, {"id": "other"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        rec = Received(request.path, dict(request.headers), await request.json(),
                       time.perf_counter())
        idx = len(self.received)
        self.received.append(rec)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if idx in self.error_at:
            status = self.error_at[idx]
            self._finish(rec)
            return web.json_response({"error": {"message": f"scripted failure {status}",
                                                "type": "bad", "code": status}}, status=status)
        return await self._stream(request, rec, idx)

    def _finish(self, rec: Received) -> None:
        # NOTE: called before the last bytes go out: once the client reads them it may send
        # its next request, which must find this one ended and out of flight
        rec.end = time.perf_counter()
        self._in_flight -= 1

    async def _stream(self, request: web.Request, rec: Received, idx: int) -> web.StreamResponse:
        body = rec.body
        is_chat = request.path.endswith("/chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            if is_chat:
                return {"index": 0, "delta": {"content": text} if text else {},
                        "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if is_chat:  # a role-only chunk first, as vLLM sends: it carries no content
            await send({"id": f"r{idx}", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        num_tokens = body["max_tokens"]
        await asyncio.sleep(self.ttft_s)
        for first in range(0, num_tokens, self.tokens_per_chunk):
            if first:
                await asyncio.sleep(self.itl_s)
            last = min(first + self.tokens_per_chunk, num_tokens)
            text = "".join(f"r{idx}t{i} " for i in range(first, last))
            rec.answer += text
            await send({"id": f"r{idx}", "choices": [choice(text)]})
        await send({"id": f"r{idx}", "choices": [choice("", "length")]})
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            words = _words(body)
            await send({"id": f"r{idx}", "choices": [], "usage": {
                "prompt_tokens": len(words), "completion_tokens": num_tokens,
                "total_tokens": len(words) + num_tokens,
                "prompt_tokens_details": {"cached_tokens": self._cached(words, rec)}}})
        self._finish(rec)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _cached(self, words: list[str], rec: Received) -> int:
        best = 0
        for other in self.received:
            if other is rec:
                continue
            shared = 0
            for a, b in zip(words, _words(other.body)):
                if a != b:
                    break
                shared += 1
            best = max(best, shared)
        return best

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAIServer:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/chat/completions", self._complete)
            app.router.add_post("/v1/completions", self._complete)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]
            started.set()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
