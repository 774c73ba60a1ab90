"""ServerState: the worker's engine client, readiness, admission (503 / 429) and per-request
metrics. Handlers reach the engine only through `ServerState.generate`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ember.config import ServerConfig
from ember.engine.core_process import EngineCoreError
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
        self.check_serving()
        if self.num_queued >= self.config.max_queued_requests:
            raise APIError(429, f"too many requests waiting ({self.num_queued}); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})

    def check_serving(self) -> None:
        """Raises 503 unless the engine is up and the server is not draining."""
        if self.is_draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.client is None:
            why = (f"the engine failed to start: {self.startup_error}" if self.startup_error
                   else "the model is still loading")
            raise APIError(503, why, headers={"Retry-After": "5"})
        if not self.client.is_running:
            raise APIError(503, "the engine is not running", headers={"Retry-After": "5"})

    def generate(self, prompt: PromptType, params: SamplingParams,
                 request_id: str | None = None,
                 kv_transfer: dict[str, Any] | None = None) -> TrackedStream:
        """Submit a request now and stream its outputs, recording its metrics.

        The request counts as queued from this call until its first output. The caller must
        close the stream (`aclose`): that aborts an unfinished request at once.
        """
        try:
            stream = self.client.generate(prompt, params, request_id or uuid.uuid4().hex,
                                          kv_transfer)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        return TrackedStream(self, stream)


class TrackedStream:
    """One request's outputs, observed for the metrics and the queue count on the way."""

    def __init__(self, state: ServerState, stream: Any) -> None:
        self._state = state
        self._metrics = state.metrics
        self._stream = stream
        self._start = time.monotonic()
        self._last: float | None = None  # when the latest token arrived
        self._num_tokens = 0
        self._is_queued = True
        state.num_queued += 1

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._stream.__anext__()
        except ValueError as err:  # the core refused the request (bad input)
            self._release()
            raise APIError(400, str(err)) from err
        except EngineCoreError as err:  # it failed in flight (e.g. its KV transfer)
            self._release()
            raise APIError(500, str(err)) from err
        except BaseException:
            self._release()
            raise
        self._observe(out)
        return out

    def _observe(self, out: RequestOutput) -> None:
        metrics, now = self._metrics, time.monotonic()
        if self._is_queued:
            self._release()
            num_prompt = len(out.prompt_token_ids)
            metrics.prompt_tokens.inc(num_prompt)
            metrics.prefix_cache_queries.inc(num_prompt)
            metrics.prefix_cache_hits.inc(out.num_cached_tokens)
        new = sum(len(s.delta_token_ids) for s in out.outputs)
        if new:
            for arrived in out.step_arrival_times or (now,):
                if self._last is None:
                    metrics.ttft.observe(arrived - self._start)
                else:
                    metrics.itl.observe(arrived - self._last)
                self._last = arrived
            self._num_tokens += new
        if out.finished:
            metrics.generation_tokens.inc(self._num_tokens)
            metrics.e2e.observe(now - self._start)
            for seq in out.outputs:
                metrics.observe_finished(seq.finish_reason or "abort")

    def _release(self) -> None:
        if self._is_queued:
            self._is_queued = False
            self._state.num_queued -= 1

    async def aclose(self) -> None:
        self._release()
        await self._stream.aclose()

    def __del__(self) -> None:
        self._release()
