"""Plumbing shared by the handlers: Server-Sent Events, merging several requests' streams, and
abandoning a request whose client went away (non-streamed responses included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from ember.engine.outputs import RequestOutput
from ember.server.errors import APIError, error_sse

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise asyncio.CancelledError("the client disconnected")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_outputs(streams: list[AsyncIterator[RequestOutput]]
                        ) -> list[RequestOutput | None]:
    """Each stream's first output, so a request the engine refuses fails before any header is
    sent (a 400, not a broken stream). Closes every stream if one fails."""
    try:
        return list(await asyncio.gather(*(anext(s, None) for s in streams)))
    except BaseException:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        raise


async def merged(streams: list[AsyncIterator[RequestOutput]],
                 firsts: list[RequestOutput | None]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they arrive, starting with `firsts`."""
    for i, out in enumerate(firsts):
        if out is not None:
            yield i, out
    pending = {asyncio.ensure_future(anext(s, None)): i for i, s in enumerate(streams)
               if firsts[i] is not None and not firsts[i].finished}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                out = fut.result()
                if out is None:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[i], None))] = i
    finally:
        for fut in pending:
            fut.cancel()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()


def event_stream(events: AsyncIterator[str],
                 headers: dict[str, str] | None = None) -> StreamingResponse:
    """An SSE response; an error after the first byte becomes an error event, then [DONE]."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield error_sse(err)
        except Exception as err:  # the status line is sent: report in-band, never hang
            yield error_sse(APIError(500, f"the request failed: {err}"))
        yield SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})
