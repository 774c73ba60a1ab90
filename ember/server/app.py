"""The FastAPI application of one worker: routes, error handlers, middleware, and the engine's
start and stop in the app's lifespan (HTTP is up and answering 503 while the model loads)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ember.config import EngineConfig
from ember.server.chat import create_chat_completion
from ember.server.completions import create_completion
from ember.server.errors import APIError, error_response, install_error_handlers
from ember.server.kv_transfer import ReserveRequest, reserve
from ember.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.state import ServerState

logger = logging.getLogger(__name__)


async def _start_engine(state: ServerState, engine_config: EngineConfig,
                        on_ready: Callable[[ServerState], None],
                        on_failed: Callable[[str], None]) -> None:
    from ember.engine.async_client import AsyncEngineClient

    try:
        state.client = await AsyncEngineClient.start(engine_config)
    except Exception as err:
        state.startup_error = str(err)
        logger.error("the engine failed to start: %s", err)
        on_failed(str(err))
        return
    on_ready(state)


def build_app(state: ServerState, engine_config: EngineConfig, *,
              on_ready: Callable[[ServerState], None] = lambda _: None,
              on_failed: Callable[[str], None] = lambda _: None) -> Any:
    """The ASGI app: FastAPI wrapped in the auth and body-size middleware."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start_engine(state, engine_config, on_ready, on_failed))
        try:
            yield
        finally:
            state.is_draining = True
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if state.client is not None:
                await state.client.shutdown()

    app = FastAPI(title="ember", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            state.check_serving()
        except APIError as err:
            return error_response(err)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state.check_serving()
        max_len = state.max_model_len
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "ember", "root": engine_config.model.model, "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.get("/kv_cache/snapshot")
    async def kv_snapshot() -> dict[str, Any]:
        """Block hashes this worker's prefix cache holds, by tier (for routers); replay the
        KV-event batches numbered above `seq` on top of it."""
        state.check_serving()
        return await state.client.get_kv_snapshot()

    @app.post("/kv_transfer/reserve")
    async def kv_reserve(body: ReserveRequest) -> dict[str, Any]:
        """Decode role: blocks for a request's prompt that a prefill worker will fill."""
        return await reserve(body, state)

    @app.delete("/kv_transfer/reserve/{transfer_id}")
    async def kv_release(transfer_id: str) -> dict[str, Any]:
        state.check_serving()
        state.client.release_kv(transfer_id)
        return {"transfer_id": transfer_id, "released": True}

    @app.get("/load")
    async def load() -> dict[str, Any]:
        """What this worker is doing now, in tokens (routers correct their own count by it)."""
        state.check_serving()
        stats = await asyncio.wait_for(state.client.get_stats(), timeout=5.0)
        return {"role": engine_config.disagg.role,
                "running": stats.num_running, "waiting": stats.num_waiting,
                "prefill_tokens": stats.num_pending_prefill_tokens,
                "decode_tokens": stats.num_pending_decode_tokens, "kv_usage": stats.kv_usage}

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = None
        if state.client is not None and state.client.is_running:
            with contextlib.suppress(Exception):
                stats = await asyncio.wait_for(state.client.get_stats(), timeout=2.0)
        return Response(state.metrics.render(stats),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    asgi: Any = BodyLimitMiddleware(app, state.config.max_request_bytes)
    if state.config.api_key:
        asgi = ApiKeyMiddleware(asgi, state.config.api_key)
    asgi.fastapi = app  # for tests and the OpenAPI schema
    return asgi
