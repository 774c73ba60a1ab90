"""A stand-in worker for `ember bench router-overhead`: OpenAI-shaped chat streams whose every
chunk carries the CLOCK_MONOTONIC time (ns) at which it was written, so a client on the same
host can tell how long each token took to reach it, directly or through a router.

    python -m ember.bench.timestamp_worker --port 8001 [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

MODEL = "timestamps"


def _chunk(i: int) -> bytes:
    body = {"id": "ts", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}],
            "t_ns": time.monotonic_ns()}
    return f"data: {json.dumps(body)}\n\n".encode()


def build_app(interval_s: float) -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        num_tokens = int((await request.json()).get("max_tokens", 16))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(num_tokens):
            if i:
                await asyncio.sleep(interval_s)
            await resp.write(_chunk(i))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/v1/models", models),
                    web.post("/v1/chat/completions", chat)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval-ms", type=float, default=20.0, help="Between tokens.")
    args = parser.parse_args()
    web.run_app(build_app(args.interval_ms / 1000), host=args.host, port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
