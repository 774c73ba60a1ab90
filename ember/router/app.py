"""The router's FastAPI app: the OpenAI endpoints (proxied), its own /health and /metrics,
and /workers to register and deregister workers at run time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ember.config import RouterConfig
from ember.router.disagg import Disaggregator, DisaggSettings
from ember.router.fleet import Fleet
from ember.router.metrics import RouterMetrics
from ember.router.proxy import Proxy, estimate_tokens, routing_request
from ember.router.routing import Dispatcher, make_policy
from ember.server.errors import APIError, install_error_handlers
from ember.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware

logger = logging.getLogger(__name__)

_FORWARDED = ("content-type", "x-session-affinity", "x-request-id")


class WorkerRegistration(BaseModel):
    url: str


def _cache_view(config: RouterConfig) -> Any:
    if config.model is None:
        return None
    from ember.model.tokenizer import load_tokenizer
    from ember.router.cache_view import CacheView

    return CacheView(load_tokenizer(config.model))


async def _follow_caches(cache: Any, fleet: Fleet, interval_s: float) -> None:
    while True:
        with contextlib.suppress(Exception):
            await cache.sync(fleet)
        await asyncio.sleep(interval_s)


async def _follow_fleet_file(watcher: Any, fleet: Fleet, dispatcher: Dispatcher, http: Any,
                             interval_s: float) -> None:
    """Workers the file adds join; workers it drops leave (their running streams finish);
    reloadable weights take effect."""
    while True:
        await asyncio.sleep(interval_s)
        change = watcher.poll()
        if change is None:
            continue
        previous, new = change
        for url in set(previous.workers) - set(new.workers):
            fleet.remove(url)
            dispatcher.remove_worker(url)
        for url in new.workers:
            dispatcher.add_worker(fleet.add(url).url)
        dispatcher.reconfigure(new.options)
        await fleet.check_health(http)
        logger.info("fleet file reloaded: %d worker(s)", len(fleet.workers))


def build_router_app(config: RouterConfig,
                     count_tokens: Callable[[dict[str, Any]], int] = estimate_tokens) -> Any:
    cache = _cache_view(config)
    fleet = Fleet(list(config.workers), failure_threshold=config.failure_threshold,
                  breaker_s=config.breaker_s)
    metrics = RouterMetrics(fleet)
    dispatcher = Dispatcher(make_policy(config.routing_policy, config.decode_weight),
                            config.session_affinity, config.affinity_load_factor)
    for url in fleet.workers:
        dispatcher.add_worker(url)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=config.request_timeout_s, sock_connect=5)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
                limit=0)) as http:
            disaggregator = Disaggregator(
                fleet, dispatcher, make_policy(config.routing_policy, config.decode_weight),
                metrics, http, DisaggSettings(config.min_remote_prefill_tokens,
                                              config.max_prefill_queue_tokens,
                                              prefill_timeout_s=config.prefill_timeout_s))
            state["proxy"] = Proxy(fleet, dispatcher, metrics, http, config.max_attempts,
                                   disaggregator)
            await fleet.check_health(http)
            tasks = [asyncio.create_task(fleet.run_health_checks(http, config.health_interval_s))]
            if config.config is not None:
                from ember.router.fleet_file import FleetFileWatcher

                tasks.append(asyncio.create_task(_follow_fleet_file(
                    FleetFileWatcher(config.config), fleet, dispatcher, http,
                    config.health_interval_s)))
            if cache is not None:
                await cache.sync(fleet)
                tasks.append(asyncio.create_task(
                    _follow_caches(cache, fleet, config.health_interval_s)))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if cache is not None:
                    await cache.close()

    app = FastAPI(title="ember router", lifespan=lifespan)
    install_error_handlers(app)

    async def _proxy(request: Request, path: str) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise APIError(400, "the request body is not valid JSON") from err
        if not isinstance(payload, dict):
            raise APIError(400, "the request body must be a JSON object")
        session_id = request.headers.get("x-session-affinity")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        hashes: list[str] = []
        if cache is not None and (ids := cache.prompt_tokens(payload)) is not None:
            hashes = cache.block_hashes(ids)
            req = routing_request(payload, lambda _: len(ids), session_id,
                                  cache.cached_tiers(hashes), hashes, cache.block_size)
        else:
            req = routing_request(payload, count_tokens, session_id)
        on_dispatch = (lambda url: cache.routed(url, hashes)) if cache is not None else None
        return await state["proxy"].forward(path, body, headers, req, bool(payload.get("stream")),
                                            on_dispatch, payload)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _proxy(request, "/v1/completions")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        ids = sorted({m for w in fleet.serving() for m in w.model_ids})
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "ember"}
                                           for i in ids]}

    @app.get("/health")
    async def health() -> Response:
        if not fleet.serving():
            raise APIError(503, "no healthy worker", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "workers": len(fleet.serving()),
                             "prefill_workers": len(fleet.prefillers())})

    @app.get("/workers")
    async def workers() -> dict[str, Any]:
        return {"workers": [{**w.snapshot(), "indexed_blocks": None if cache is None
                             else cache.indexed_blocks(w.url)} for w in fleet.workers.values()]}

    @app.post("/workers")
    async def register(body: WorkerRegistration) -> dict[str, Any]:
        worker = fleet.add(body.url)
        dispatcher.add_worker(worker.url)
        await fleet.check_health(state["proxy"].http)
        return worker.snapshot()

    @app.delete("/workers")
    async def deregister(url: str) -> dict[str, Any]:
        worker = fleet.remove(url)
        if worker is None:
            raise APIError(404, f"no worker {url!r}", param="url")
        dispatcher.remove_worker(worker.url)
        return worker.snapshot()

    @app.get("/metrics")
    async def router_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    asgi: Any = BodyLimitMiddleware(app, config.max_request_bytes)
    if config.api_key:
        asgi = ApiKeyMiddleware(asgi, config.api_key, ("/v1", "/workers"))
    asgi.fastapi, asgi.fleet = app, fleet
    return asgi
