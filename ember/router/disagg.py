"""Disaggregated prefill and decode, orchestrated per request (see docs/disaggregation.md):

1. pick a decode worker (the usual cost function and affinity, over decode workers) and
   reserve blocks for the prompt there (`POST /kv_transfer/reserve`);
2. pick a prefill worker (cost function, cache-aware) and send it the request with
   max_tokens=1 and `kv_transfer_params.do_remote_decode`: it computes the prompt, writes the
   KV into the reservation and answers with the first token(s);
3. hand the request to the decode worker with the reservation and those tokens; the proxy
   streams its answer.

Or prefill on the decode worker itself, when the uncached part of the prompt is short, every
prefill worker is saturated, no prefill worker answers, or the request needs what a remote
prefill does not carry (logprobs, echo, structured output). Each decision is counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from ember.router.fleet import Fleet, LoadTicket, Worker
from ember.router.metrics import RouterMetrics
from ember.router.policy import Policy, RoutingRequest
from ember.router.routing import Dispatcher

logger = logging.getLogger(__name__)

_REFUSED: dict[str, Any] = {}  # a reservation the decode worker refused as a bad request


@dataclass(frozen=True)
class DisaggSettings:
    min_remote_prefill_tokens: int = 256  # uncached prompt tokens below which D prefills
    max_prefill_queue_tokens: int = 32768  # a prefill worker with more in flight is saturated
    max_attempts: int = 2  # decode workers to reserve on, prefill workers to try
    prefill_timeout_s: float = 20.0  # a prefill worker silent this long has failed


@dataclass(frozen=True)
class Handoff:
    worker: Worker  # the decode worker chosen (holding the filled reservation, if any)
    body: bytes | None  # the request naming the reservation and first tokens; None: whole
    prefill_tokens: int  # what the decode worker still computes


class Disaggregator:
    def __init__(self, fleet: Fleet, dispatcher: Dispatcher, prefill_policy: Policy,
                 metrics: RouterMetrics, http: aiohttp.ClientSession,
                 settings: DisaggSettings) -> None:
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.prefill_policy = prefill_policy
        self.metrics = metrics
        self.http = http
        self.settings = settings

    async def prepare(self, path: str, payload: dict[str, Any], req: RoutingRequest
                      ) -> Handoff | None:
        """The decode worker for the request, with its filled reservation when the prompt
        was prefilled elsewhere; None when the proxy should route it as usual."""
        reason = _unsupported(payload)
        if reason is not None:
            self.metrics.disagg(reason)
            return None
        tried: set[str] = set()
        for _ in range(self.settings.max_attempts):
            routed = self.dispatcher.decide(req, self.fleet.serving(exclude=tried))
            if routed is None:
                break
            self.metrics.routed(routed)
            decode = routed.decision.worker
            tried.add(decode.url)
            local = Handoff(decode, None,
                            req.num_prompt_tokens - routed.decision.predicted_cached_tokens)
            if (reason := self._local_reason(req, decode)) is not None:
                self.metrics.disagg(reason)
                return local
            reservation = await self._reserve(decode, path, payload)
            if reservation is _REFUSED:  # the request itself is bad: the worker will say why
                self.metrics.disagg("local_reserve_refused")
                return local
            if reservation is None:
                continue
            try:
                first = await self._prefill(path, payload, req, reservation)
            except BaseException:  # the client left (cancelled): free the blocks now
                await asyncio.shield(self._release(decode, reservation["transfer_id"]))
                raise
            if first is None:
                await self._release(decode, reservation["transfer_id"])
                self.metrics.disagg("local_prefill_failed")
                return local
            self.metrics.disagg("remote")
            params = {"transfer_id": reservation["transfer_id"], "first_token_ids": first}
            body = json.dumps({**payload, "kv_transfer_params": params}).encode()
            return Handoff(decode, body, 0)
        if tried:  # every decode worker tried was full: whichever has room first prefills
            self.metrics.disagg("local_no_room")
        return None

    def _local_reason(self, req: RoutingRequest, decode: Worker) -> str | None:
        uncached = req.num_prompt_tokens - req.cached_tokens(decode.url, weighted=False)
        if uncached < self.settings.min_remote_prefill_tokens:
            return "local_short"
        prefillers = self.fleet.prefillers()
        if not prefillers:
            return "local_no_prefill_worker"
        if all(w.load_prefill_tokens >= self.settings.max_prefill_queue_tokens
               for w in prefillers):
            return "local_saturated"
        return None

    async def _reserve(self, decode: Worker, path: str,
                       payload: dict[str, Any]) -> dict[str, Any] | None:
        endpoint = "chat" if path.endswith("chat/completions") else "completions"
        body = {"endpoint": endpoint, "request": payload,
                "transfer_id": f"xfer-{uuid.uuid4().hex}"}
        try:
            async with self.http.post(f"{decode.url}/kv_transfer/reserve", json=body) as resp:
                if resp.status == 200:
                    return await resp.json()
                if 400 <= resp.status < 500:
                    return _REFUSED
                why = f"HTTP {resp.status}: {(await resp.text())[:200]}"
        except (TimeoutError, aiohttp.ClientError) as err:
            why = repr(err)
            self.fleet.record_failure(decode, why)
        logger.info("no reservation on %s: %s", decode.url, why)
        return None

    async def _prefill(self, path: str, payload: dict[str, Any], req: RoutingRequest,
                       reservation: dict[str, Any]) -> list[int] | None:
        body = _prefill_body(payload, reservation)
        tried: set[str] = set()
        for _ in range(self.settings.max_attempts):
            candidates = [w for w in self.fleet.prefillers() if w.url not in tried]
            decision = self.prefill_policy.choose(req, candidates)
            if decision is None:
                return None
            worker = decision.worker
            tried.add(worker.url)
            self.prefill_policy.routed(req, worker)
            ticket = LoadTicket(worker, req.num_prompt_tokens - decision.predicted_cached_tokens,
                                1)
            try:
                first = await self._send_prefill(worker, path, body)
            finally:
                ticket.release()
            if first is not None:
                self.fleet.record_success(worker)
                return first
        return None

    async def _send_prefill(self, worker: Worker, path: str,
                            body: dict[str, Any]) -> list[int] | None:
        timeout = aiohttp.ClientTimeout(total=self.settings.prefill_timeout_s)
        try:
            async with self.http.post(f"{worker.url}{path}", json=body, timeout=timeout) as resp:
                data = await resp.json(content_type=None)
                if resp.status == 200:
                    return [int(t) for t in data["kv_transfer_params"]["first_token_ids"]]
                why = f"HTTP {resp.status}: {json.dumps(data)[:200]}"
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as err:
            why = repr(err)
        logger.warning("prefill on %s failed: %s", worker.url, why)
        self.fleet.record_failure(worker, why)
        self.metrics.upstream_errors.labels("prefill").inc()
        return None

    async def _release(self, decode: Worker, transfer_id: str) -> None:
        try:
            async with self.http.delete(f"{decode.url}/kv_transfer/reserve/{transfer_id}"):
                pass
        except (TimeoutError, aiohttp.ClientError):  # it expires on its own
            pass


def _unsupported(payload: dict[str, Any]) -> str | None:
    """Requests a remote prefill cannot serve exactly: served whole instead."""
    if payload.get("kv_transfer_params") is not None:
        return "local_client_kv_params"
    if payload.get("logprobs") or payload.get("echo") or payload.get("prompt_logprobs"):
        return "local_unsupported"
    fmt = payload.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        return "local_unsupported"
    if payload.get("tools") and payload.get("tool_choice", "auto") != "none":
        return "local_unsupported"
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return "local_unsupported" if len(prompt) != 1 else None
    return None


def _prefill_body(payload: dict[str, Any], reservation: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in payload.items()
            if k not in ("stream", "stream_options", "max_completion_tokens")}
    body.update(max_tokens=1, stream=False,
                min_tokens=min(int(payload.get("min_tokens") or 0), 1),
                kv_transfer_params={"do_remote_decode": True, "peer": reservation["peer"],
                                    "block_ids": reservation["block_ids"],
                                    "first_block": reservation["first_block"],
                                    "expires_at_unix": reservation.get("expires_at_unix")})
    return body
