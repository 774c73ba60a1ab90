"""Forwarding one request: pick a worker, send it, retry elsewhere while nothing has reached
the client, then relay the worker's bytes as they come (no buffering). Load tickets are
released on every path; a failure after the first byte ends the stream with an error event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import aiohttp
from fastapi.responses import Response, StreamingResponse

from ember.router.disagg import Disaggregator
from ember.router.fleet import Fleet, LoadTicket, Worker
from ember.router.metrics import RouterMetrics
from ember.router.policy import RoutingRequest
from ember.router.routing import Dispatcher
from ember.server.errors import APIError, error_sse
from ember.server.streaming import SSE_DONE, SSE_HEADERS
from ember.server.usage import CACHED_TOKENS_HEADER

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = (502, 503, 504)
WORKER_HEADER = "x-ember-worker"  # which worker served the response


class Proxy:
    def __init__(self, fleet: Fleet, dispatcher: Dispatcher, metrics: RouterMetrics,
                 http: aiohttp.ClientSession, max_attempts: int = 3,
                 disaggregator: Disaggregator | None = None) -> None:
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.http = http
        self.max_attempts = max_attempts
        self.disaggregator = disaggregator

    async def forward(self, path: str, body: bytes, headers: dict[str, str],
                      req: RoutingRequest, stream: bool,
                      on_dispatch: Callable[[str], None] | None = None,
                      payload: dict[str, Any] | None = None) -> Response:
        tried: set[str] = set()
        last_error = "no eligible worker"
        handoff = None
        if self.disaggregator is not None and payload is not None and self.fleet.prefillers():
            handoff = await self.disaggregator.prepare(path, payload, req)
        for attempt in range(self.max_attempts):
            if handoff is not None:  # decided by the disaggregator
                worker, prefill = handoff.worker, handoff.prefill_tokens
                sent = handoff.body if handoff.body is not None else body
            else:
                routed = self.dispatcher.decide(req, self.fleet.serving(tried),
                                                retry=attempt > 0)
                if routed is None:
                    break
                self.metrics.routed(routed)
                worker, sent = routed.decision.worker, body
                prefill = req.num_prompt_tokens - routed.decision.predicted_cached_tokens
            tried.add(worker.url)
            ticket = LoadTicket(worker, prefill, req.max_tokens)
            if on_dispatch is not None:
                on_dispatch(worker.url)
            try:
                result = await self._attempt(worker, ticket, path, sent, headers, stream)
            except _Retry as retry:
                ticket.release()
                last_error = f"{worker.url}: {retry}"
                self.fleet.record_failure(worker, str(retry))
                self.metrics.upstream_errors.labels(retry.kind).inc()
                handoff = None
                continue
            except BaseException:
                ticket.release()
                raise
            if handoff is not None and handoff.body is not None and result.status_code == 400:
                # the reservation was gone (expired, or its worker restarted): prefill there
                self.metrics.disagg("local_reservation_lost")
                handoff = replace(handoff, body=None, prefill_tokens=req.num_prompt_tokens)
                tried.discard(worker.url)
                continue
            self.fleet.record_success(worker)
            return result
        raise APIError(503 if not tried else 502,
                       f"no worker could serve the request ({last_error})",
                       headers={"Retry-After": "1"})

    async def _attempt(self, worker: Worker, ticket: LoadTicket, path: str, body: bytes,
                       headers: dict[str, str], stream: bool) -> Response:
        """The worker's answer; raises _Retry when it failed before anything was sent on."""
        try:
            resp = await self.http.post(f"{worker.url}{path}", data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise _Retry("connect", repr(err)) from err
        relayed = {WORKER_HEADER: worker.url}
        if (cached := resp.headers.get(CACHED_TOKENS_HEADER, "")).isdigit():
            self.metrics.actual_cached_tokens.inc(int(cached))
            relayed[CACHED_TOKENS_HEADER] = cached
        if resp.status in _RETRYABLE_STATUS:
            text = await resp.text()
            resp.release()
            raise _Retry("status", f"HTTP {resp.status}: {text[:200]}")
        if not stream or resp.status != 200:
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as err:
                raise _Retry("read", repr(err)) from err
            finally:
                resp.release()
            ticket.release()
            return Response(data, status_code=resp.status, headers=relayed,
                            media_type=resp.headers.get("content-type", "application/json"))
        try:
            first = await resp.content.readany()
        except (TimeoutError, aiohttp.ClientError) as err:
            resp.close()
            raise _Retry("read", repr(err)) from err
        if not first:
            resp.close()
            raise _Retry("read", "the worker closed the stream before any byte")
        ticket.first_byte()
        return StreamingResponse(self._relay(worker, ticket, resp, first),
                                 media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **relayed})

    async def _relay(self, worker: Worker, ticket: LoadTicket, resp: aiohttp.ClientResponse,
                     first: bytes) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as err:
            self.fleet.record_failure(worker, repr(err))
            self.metrics.upstream_errors.labels("midstream").inc()
            yield error_sse(APIError(502, f"worker {worker.url} failed mid-stream: "
                                          f"{type(err).__name__}")).encode()
            yield SSE_DONE.encode()
        finally:
            ticket.release()
            resp.close()  # on a client disconnect this drops the worker's connection: it aborts


class _Retry(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def routing_request(payload: dict[str, Any], count_tokens: Any, session_id: str | None,
                    cached_tiers: dict[str, list[str]] | None = None,
                    block_hashes: list[str] | None = None, block_size: int = 16
                    ) -> RoutingRequest:
    """What routing needs from an OpenAI body: prompt tokens (counted or estimated) and the
    decode budget."""
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or 256
    n = payload.get("n") or 1
    if not isinstance(max_tokens, int) or not isinstance(n, int):
        max_tokens, n = 256, 1
    return RoutingRequest(count_tokens(payload), max_tokens * max(n, 1), session_id,
                          cached_tiers or {}, tuple(block_hashes or ()), block_size)


def estimate_tokens(payload: dict[str, Any]) -> int:
    """Without a tokenizer: ~4 bytes of text per token (token-id prompts are counted)."""
    prompt = payload.get("prompt", payload.get("messages", ""))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return max(1, len(json.dumps(prompt, ensure_ascii=False).encode()) // 4)
