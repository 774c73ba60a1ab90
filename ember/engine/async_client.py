"""AsyncEngineClient: the front end of an engine core running in its own process.

Tokenises, detokenises (OutputProcessor) and streams per request on the asyncio loop; one
background task reads the core's outputs. The engine loop never waits on tokenizer work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import zmq

from ember.config import EngineConfig
from ember.engine.core_process import (
    CoreProcess,
    EngineCoreError,
    EngineDeadError,
    EngineFactory,
)
from ember.engine.messages import (
    ClientMsg,
    CoreMsg,
    EngineCoreFailure,
    EngineCoreOutput,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreStats,
)
from ember.engine.output_processor import OutputProcessor
from ember.engine.outputs import RequestOutput
from ember.engine.prompts import PromptType, check_token_ids, tokenize_prompt
from ember.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids[, "prompt": text]}.


class _OutputQueue:
    """One request's outputs on their way to its `generate` caller.

    Outputs that arrive while the caller is busy are merged: the caller gets the latest state
    with every delta since its previous output, as a snapshot the processor no longer mutates,
    and the arrival time of each step merged into it (so latency metrics see every step).
    """

    def __init__(self, n: int) -> None:
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.delta_text = [""] * n
        self.num_taken_token_ids = [0] * n
        self.num_put_tokens = 0
        self.step_arrival_times: list[float] = []
        self.event = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        self.latest = out
        num_tokens = 0
        for i, seq in enumerate(out.outputs):
            self.delta_text[i] += seq.delta_text
            num_tokens += len(seq.token_ids)
        if num_tokens > self.num_put_tokens:
            self.num_put_tokens = num_tokens
            self.step_arrival_times.append(time.monotonic())
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.event.set()

    async def get(self) -> RequestOutput:
        while True:
            out = self._take()
            if out is not None:
                return out
            if self.error is not None:
                raise self.error
            self.event.clear()
            await self.event.wait()

    def _take(self) -> RequestOutput | None:
        live, self.latest = self.latest, None
        if live is None:
            return None
        seqs = []
        for i, seq in enumerate(live.outputs):
            num_taken, self.num_taken_token_ids[i] = self.num_taken_token_ids[i], len(seq.token_ids)
            seqs.append(dataclasses.replace(
                seq, token_ids=list(seq.token_ids),
                logprobs=None if seq.logprobs is None else list(seq.logprobs),
                delta_text=self.delta_text[i], delta_token_ids=seq.token_ids[num_taken:]))
            self.delta_text[i] = ""
        prompt_logprobs = None if live.prompt_logprobs is None else list(live.prompt_logprobs)
        times, self.step_arrival_times = self.step_arrival_times, []
        return dataclasses.replace(live, outputs=seqs, prompt_logprobs=prompt_logprobs,
                                   step_arrival_times=times)


class RequestStream:
    """The outputs of one request, as an async iterator; the last has `finished=True`.

    Contract: leaving it before the end (break, an exception, task cancellation, `aclose()`,
    or simply dropping it) aborts the request in the core at once.
    """

    def __init__(self, client: AsyncEngineClient, request_id: str, queue: _OutputQueue) -> None:
        self.request_id = request_id
        self._client: AsyncEngineClient | None = client  # None once finished or aborted
        self._queue = queue

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._client is None:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:
            self._abort()
            raise
        if out.finished:
            self._client = None
        return out

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client._abort(self.request_id)

    def __del__(self) -> None:
        # NOTE: `break` out of `async for` drops the last reference here, synchronously;
        # an async generator would only abort once the loop got round to closing it.
        with contextlib.suppress(Exception):
            self._abort()


class _Starting:
    """What `AsyncEngineClient.start` returns: await it, or use it as `async with`."""

    def __init__(self, start: Callable[[], Awaitable[AsyncEngineClient]]) -> None:
        self._start = start
        self._client: AsyncEngineClient | None = None

    def __await__(self) -> Generator[Any, None, AsyncEngineClient]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncEngineClient:
        self._client = await self._start()
        return self._client

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._client is not None
        await self._client.shutdown()


class AsyncEngineClient:
    """Streams requests through an engine core in a spawned process.

    Contract: `generate` yields RequestOutputs (with `delta_text`/`delta_token_ids`) as tokens
    arrive, the last with `finished=True`; leaving it early aborts the request in the core at
    once; a refused request raises ValueError with the core's message; a core failure raises
    EngineCoreError, a dead core EngineDeadError, never a hang.
    """

    def __init__(self, config: EngineConfig, tokenizer: Any, ready: EngineCoreReady,
                 core: CoreProcess) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_info: dict[str, Any] = ready.model_info
        self.runtime: dict[str, Any] = ready.runtime
        self._core = core
        self._processor = OutputProcessor(tokenizer)
        self._streams: dict[str, _OutputQueue] = {}
        self._stats_waiters: deque[asyncio.Future[EngineCoreStats]] = deque()
        self._snapshot_waiters: deque[asyncio.Future[dict[str, Any]]] = deque()
        self._reserve_waiters: deque[asyncio.Future[dict[str, Any]]] = deque()
        self._dead: EngineDeadError | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(core.sentinel, self._on_core_exit)
        self._output_task = self._loop.create_task(self._read_outputs(), name="ember-core-outputs")
        self._output_task.add_done_callback(self._on_output_task_done)

    # ---- life cycle ----------------------------------------------------------------------

    @classmethod
    def start(cls, config: EngineConfig, *, engine_factory: EngineFactory | None = None,
              startup_timeout_s: float = 600.0) -> _Starting:
        """Spawn the core, load the tokenizer meanwhile, and wait for the core's READY.

        `await AsyncEngineClient.start(config)` or `async with AsyncEngineClient.start(config)
        as client:`. `engine_factory` (a picklable callable) builds something other than
        `EngineCore(config)` in the child, for tests. The core is a *spawned* process: the
        caller's `__main__` must be import-safe (`if __name__ == "__main__":`).
        """
        return _Starting(lambda: cls._start(config, engine_factory, startup_timeout_s))

    @classmethod
    async def _start(cls, config: EngineConfig, engine_factory: EngineFactory | None,
                     startup_timeout_s: float) -> AsyncEngineClient:
        from ember.model.tokenizer import load_tokenizer

        core = CoreProcess(config, engine_factory)
        ready_task = asyncio.ensure_future(core.wait_ready(startup_timeout_s))
        try:  # the tokenizer loads here while the model loads there
            tokenizer = await asyncio.to_thread(load_tokenizer, config.model.model)
            ready = await ready_task
        except BaseException:
            ready_task.cancel()
            with contextlib.suppress(BaseException):
                await ready_task
            await asyncio.to_thread(core.stop_process, 0.0)
            core.close()
            raise
        return cls(config, tokenizer, ready, core)

    async def __aenter__(self) -> AsyncEngineClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown()

    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._closed

    @property
    def pid(self) -> int | None:
        return self._core.pid

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the core (politely, then by signal) and release sockets; idempotent."""
        if self._closed:
            return
        if self._dead is None:
            with contextlib.suppress(zmq.ZMQError):
                self._core.send(ClientMsg.SHUTDOWN)
        self._closed = True
        self._loop.remove_reader(self._core.sentinel)
        self._fail_all(EngineDeadError("the engine client was shut down"))
        await asyncio.to_thread(self._core.stop_process, timeout_s)
        self._output_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._output_task
        self._core.close()

    # ---- requests ------------------------------------------------------------------------

    def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                 request_id: str | None = None,
                 kv_transfer: dict[str, Any] | None = None) -> RequestStream:
        """Submit a request now; iterate the result (`async for`) to stream its outputs.

        Raises ValueError at once for a bad prompt or a request_id in use; a request the core
        refuses raises ValueError from the iteration.
        """
        self._check_alive()
        params = sampling_params if sampling_params is not None else SamplingParams()
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        check_token_ids(token_ids, self.model_info["vocab_size"])  # before detokenizing them
        check_token_ids(params.stop_token_ids, self.model_info["vocab_size"], "stop_token_ids")
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        queue = _OutputQueue(params.n)
        self._send(ClientMsg.ADD, EngineCoreRequest(request_id, token_ids, params,
                                                    time.monotonic(), kv_transfer).to_wire())
        self._streams[request_id] = queue
        self._processor.add_request(request_id, text, token_ids, params)
        return RequestStream(self, request_id, queue)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its `generate` ends with a finished output (finish_reason "abort")."""
        self._abort(request_id)

    async def get_stats(self) -> EngineCoreStats:
        """The core's scheduler and KV counters, after every message sent before this call."""
        self._check_alive()
        waiter: asyncio.Future[EngineCoreStats] = self._loop.create_future()
        self._stats_waiters.append(waiter)
        self._send(ClientMsg.GET_STATS)
        return await waiter

    async def get_kv_snapshot(self) -> dict[str, Any]:
        """Every block hash the core's prefix cache holds, by tier, with the KV-event batch
        number it includes (see ember.kv.events)."""
        self._check_alive()
        waiter: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._snapshot_waiters.append(waiter)
        self._send(ClientMsg.GET_KV_SNAPSHOT)
        return await waiter

    async def reserve_kv(self, transfer_id: str, prompt_token_ids: list[int]) -> dict[str, Any]:
        """Decode role: reserve blocks for a prompt a prefill worker will compute (see
        ember.engine.remote_prefill); raises NoRoomError or ValueError naming the problem."""
        from ember.engine.remote_prefill import NoRoomError

        self._check_alive()
        waiter: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._reserve_waiters.append(waiter)
        self._send(ClientMsg.RESERVE_KV, [transfer_id, list(prompt_token_ids)])
        reply = await waiter
        if "error" in reply:
            raise (NoRoomError if reply.get("no_room") else ValueError)(reply["error"])
        return reply

    def release_kv(self, transfer_id: str) -> None:
        self._send(ClientMsg.RELEASE_KV, transfer_id)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        final = self._processor.abort(request_id)
        if stream is not None and final is not None:
            stream.put(final)
        if final is not None and self.is_running:
            self._send(ClientMsg.ABORT, [request_id])

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine client was shut down")

    def _send(self, kind: str, payload: Any = None) -> None:
        self._check_alive()
        self._core.send(kind, payload)

    # ---- the core's outputs --------------------------------------------------------------

    async def _read_outputs(self) -> None:
        while True:  # a transport error ends the task: see _on_output_task_done
            kind, payload = await self._core.recv()
            try:
                self._on_message(kind, payload)
            except Exception as exc:  # a bug here must fail requests, not hang them
                logger.exception("handling a message from the engine core failed")
                error = EngineCoreError(f"handling the engine core's output failed: {exc!r}")
                for request_id in list(self._streams):
                    self._end_request(request_id, error)
                    if self.is_running:
                        self._send(ClientMsg.ABORT, [request_id])

    def _on_output_task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._on_dead(EngineDeadError(f"lost the engine core's output stream: "
                                          f"{task.exception()!r}"))

    def _on_message(self, kind: str, payload: Any) -> None:
        if kind == CoreMsg.OUTPUTS:
            self._on_outputs(payload)
        elif kind == CoreMsg.STATS:
            waiter = self._stats_waiters.popleft()
            if not waiter.done():
                waiter.set_result(EngineCoreStats.from_wire(payload))
        elif kind == CoreMsg.KV_SNAPSHOT:
            waiter = self._snapshot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(payload)
        elif kind == CoreMsg.KV_RESERVED:
            waiter = self._reserve_waiters.popleft()
            if not waiter.done():
                waiter.set_result(payload)
        elif kind == CoreMsg.FAILURE:
            self._on_failure(EngineCoreFailure.from_wire(payload))
        else:
            logger.error("ignoring unexpected %r message from the engine core", kind)

    def _on_outputs(self, payload: list[Any]) -> None:
        core_outputs = []
        for data in payload:
            out = EngineCoreOutput.from_wire(data)
            if out.error is None:
                core_outputs.append(out)
            else:
                self._end_request(out.request_id, ValueError(out.error))
        request_outputs, stops = self._processor.process(core_outputs)
        if stops:
            self._send(ClientMsg.STOP, [[s.request_id, s.seq_index, s.stop_str] for s in stops])
        streams = self._streams
        for out in request_outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del streams[out.request_id]

    def _on_failure(self, failure: EngineCoreFailure) -> None:
        if failure.is_fatal:
            self._on_dead(EngineDeadError(failure.error))
            return
        for request_id in failure.request_ids:
            self._end_request(request_id, EngineCoreError(failure.error))

    def _end_request(self, request_id: str, error: BaseException) -> None:
        self._processor.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.fail(error)

    def _on_core_exit(self) -> None:
        self._loop.remove_reader(self._core.sentinel)
        proc = self._core.proc
        proc.join(timeout=1.0)  # it has exited: this only reaps it
        self._on_dead(EngineDeadError(
            f"the engine core process (pid {proc.pid}) died unexpectedly "
            f"(exit code {proc.exitcode}); in-flight requests are lost"))

    def _on_dead(self, error: EngineDeadError) -> None:
        if self._dead is None and not self._closed:
            logger.error("%s", error)
            self._dead = error
        self._fail_all(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        for request_id in list(self._streams):
            self._end_request(request_id, error)
        for waiters in (self._stats_waiters, self._snapshot_waiters, self._reserve_waiters):
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
