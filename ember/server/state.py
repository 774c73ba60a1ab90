"""ServerState: the worker's engine client, readiness, admission (503 / 429) and per-request
metrics. Handlers reach the engine only through `ServerState.generate`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ember.config import ServerConfig
from ember.engine.outputs import RequestOutput
from ember.engine.prompts import PromptType
from ember.engine.sampling_params import SamplingParams
from ember.server.errors import APIError
from ember.server.metrics import ServerMetrics


@dataclass
class ServerState:
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics
    client: Any = None  # AsyncEngineClient once the engine is up
    startup_error: str | None = None
    is_draining: bool = False
    num_queued: int = 0  # admitted requests that have no output yet
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def is_ready(self) -> bool:
        return self.client is not None and self.client.is_running and not self.is_draining

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.client.runtime["max_model_len"])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def admit(self) -> None:
        """Raises 503 while loading, draining or after the engine died; 429 when over the bound."""
        if self.is_draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.client is None:
            why = (f"the engine failed to start: {self.startup_error}" if self.startup_error
                   else "the model is still loading")
            raise APIError(503, why, headers={"Retry-After": "5"})
        if not self.client.is_running:
            raise APIError(503, "the engine is not running", headers={"Retry-After": "5"})
        if self.num_queued >= self.config.max_queued_requests:
            raise APIError(429, f"too many requests waiting ({self.num_queued}); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})

    def generate(self, prompt: PromptType, params: SamplingParams,
                          request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request now and stream its outputs, recording its metrics.

        The caller must close the iterator (`contextlib.aclosing`): that aborts an unfinished
        request at once and keeps the queue count right.
        """
        request_id = request_id or uuid.uuid4().hex
        try:
            stream = self.client.generate(prompt, params, request_id)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        return self._tracked(stream)

    async def _tracked(self, stream: Any) -> AsyncIterator[RequestOutput]:
        metrics = self.metrics
        start = last = time.monotonic()
        num_tokens = 0
        self.num_queued += 1
        is_queued = True
        try:
            async for out in stream:
                now = time.monotonic()
                new = sum(len(s.delta_token_ids) for s in out.outputs)
                if is_queued:
                    self.num_queued -= 1
                    is_queued = False
                    metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                    metrics.prefix_cache_queries.inc(len(out.prompt_token_ids))
                    metrics.prefix_cache_hits.inc(out.num_cached_tokens)
                if new:
                    if num_tokens == 0:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.itl.observe(now - last)
                    num_tokens += new
                    last = now
                if out.finished:
                    metrics.generation_tokens.inc(num_tokens)
                    metrics.e2e.observe(now - start)
                    for seq in out.outputs:
                        metrics.observe_finished(seq.finish_reason or "abort")
                yield out
        except ValueError as err:  # the core refused the request (bad input)
            raise APIError(400, str(err)) from err
        finally:
            if is_queued:
                self.num_queued -= 1
            await stream.aclose()
