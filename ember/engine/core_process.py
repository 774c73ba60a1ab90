"""The engine-core process: spawning and stopping it (parent side, `CoreProcess`), and the
busy loop that runs `EngineCore` behind two ZeroMQ sockets (child side, `CoreLoop`).

Moves messages.py shapes only; no tokenizer work ever runs in the child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from ember.config import EngineConfig
from ember.engine.messages import (
    ClientMsg,
    CoreMsg,
    EngineCoreFailure,
    EngineCoreOutput,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreStats,
    decode_msg,
    encode_msg,
    wire_dict,
)
from ember.engine.remote_prefill import NoRoomError

if TYPE_CHECKING:
    from ember.engine.engine_core import EngineCore

logger = logging.getLogger(__name__)

# Builds the engine inside the child; must be picklable (a module-level callable).
EngineFactory = Callable[[EngineConfig], "EngineCore"]


class EngineCoreError(RuntimeError):
    """The engine core failed while serving a request (not the request's fault)."""


class EngineDeadError(EngineCoreError):
    """The engine-core process is gone (crashed, killed, or shut down)."""


class CoreProcess:
    """The parent's handle on a spawned engine core: the process and the client's two sockets.

    Binds `ipc://` endpoints in a fresh temp dir, then spawns the core, which connects.
    Use from one asyncio loop; `send` never blocks (the queue to the core is unbounded).
    """

    def __init__(self, config: EngineConfig, engine_factory: EngineFactory | None = None) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="ember-")
        self._ctx = zmq.asyncio.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._output = self._ctx.socket(zmq.PULL)
        try:
            self._input.setsockopt(zmq.SNDHWM, 0)
            self._output.setsockopt(zmq.RCVHWM, 0)
            input_addr, output_addr = f"ipc://{self.ipc_dir}/input", f"ipc://{self.ipc_dir}/output"
            self._input.bind(input_addr)
            self._output.bind(output_addr)
            self.proc = start_core_process(config, input_addr, output_addr, engine_factory)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process has exited."""
        return self.proc.sentinel

    def send(self, kind: str, payload: Any = None) -> None:
        # NOTE: with SNDHWM=0 the send completes at once; the returned future is already done.
        self._input.send(encode_msg(kind, payload))

    async def recv(self) -> tuple[str, Any]:
        frame = await self._output.recv(copy=False)
        return decode_msg(frame.buffer)

    async def wait_ready(self, timeout_s: float) -> EngineCoreReady:
        """The READY handshake; raises ValueError/RuntimeError for a failed start-up."""
        deadline = time.monotonic() + timeout_s
        while not await self._output.poll(timeout=100):
            if not self.proc.is_alive():
                raise EngineDeadError(f"the engine core process exited (code "
                                      f"{self.proc.exitcode}) before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core was not ready after {timeout_s:.0f} s")
        kind, payload = await self.recv()
        if kind == CoreMsg.READY:
            return EngineCoreReady.from_wire(payload)
        if kind == CoreMsg.START_FAILED:
            if payload["error_type"] == "ValueError":  # a bad config or model dir
                raise ValueError(payload["message"])
            raise RuntimeError(f"the engine core failed to start: {payload['error_type']}: "
                               f"{payload['message']}")
        raise RuntimeError(f"the engine core sent {kind!r} before READY")

    def stop_process(self, timeout_s: float) -> None:
        """Blocking: wait for an exit (after a SHUTDOWN message), then SIGTERM, then SIGKILL."""
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

    def close(self) -> None:
        """Release the sockets and the ipc dir (on the loop's thread, after stop_process)."""
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def start_core_process(config: EngineConfig, input_addr: str, output_addr: str,
                       engine_factory: EngineFactory | None = None) -> BaseProcess:
    """Spawn the engine-core process; it connects to the two (already bound) addresses.

    `input_addr` carries ClientMsg to the core (it PULLs), `output_addr` CoreMsg back (it PUSHes).
    The first message it sends is CoreMsg.READY or CoreMsg.START_FAILED.
    """
    ctx = multiprocessing.get_context("spawn")
    log_level = logging.getLogger("ember").getEffectiveLevel()
    proc = ctx.Process(target=run_core_process, name="ember-engine-core", daemon=True,
                       args=(config, input_addr, output_addr, engine_factory, log_level))
    proc.start()
    return proc


def run_core_process(config: EngineConfig, input_addr: str, output_addr: str,
                     engine_factory: EngineFactory | None, log_level: int) -> None:
    """The child's entry point: build the engine, say READY, serve until shutdown."""
    # NOTE: Ctrl-C reaches the whole process group; the parent decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine-core] "
                                                 "%(name)s: %(message)s")
    zmq_ctx = zmq.Context()
    input_sock = zmq_ctx.socket(zmq.PULL)
    output_sock = zmq_ctx.socket(zmq.PUSH)
    output_sock.setsockopt(zmq.SNDHWM, 0)  # never block the loop on a slow reader
    input_sock.connect(input_addr)
    output_sock.connect(output_addr)
    exit_code = 1
    try:
        exit_code = _serve(config, engine_factory, input_sock, output_sock)
    except Exception as exc:  # a bug in the loop: say so before the client sees us die
        logger.exception("engine core crashed")
        failure = EngineCoreFailure(f"engine core crashed: {type(exc).__name__}: {exc}",
                                    is_fatal=True)
        output_sock.send(encode_msg(CoreMsg.FAILURE, failure.to_wire()))
    finally:
        input_sock.close(linger=0)
        output_sock.close(linger=1000)  # let a last FAILURE/START_FAILED reach the client
        zmq_ctx.term()
    # NOTE: skip interpreter teardown (seconds of torch module finalisation); nothing
    # of ours is left to clean up, and the client waits on this exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _serve(config: EngineConfig, engine_factory: EngineFactory | None, input_sock: zmq.Socket,
           output_sock: zmq.Socket) -> int:
    """Returns the process's exit code."""
    try:
        engine = _build_engine(config, engine_factory)
    except Exception as exc:
        logger.exception("engine core failed to start")
        output_sock.send(encode_msg(CoreMsg.START_FAILED, {"error_type": type(exc).__name__,
                                                           "message": str(exc)}))
        return 1
    ready = EngineCoreReady(wire_dict(engine.model_info),
                            wire_dict(engine.runtime), os.getpid())
    output_sock.send(encode_msg(CoreMsg.READY, ready.to_wire()))
    parent = multiprocessing.parent_process()
    parent_fd = parent.sentinel if parent is not None else None
    try:
        return 0 if CoreLoop(engine, input_sock, output_sock, parent_fd).run() else 1
    finally:
        close = getattr(engine, "close", None)  # test engines may have none
        if close is not None:
            close()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _build_engine(config: EngineConfig, engine_factory: EngineFactory | None) -> EngineCore:
    if engine_factory is not None:
        return engine_factory(config)
    from ember.engine.engine_core import EngineCore

    return EngineCore(config)


class CoreLoop:
    """Drains requests without blocking while there is work; blocks on the socket when idle.

    Contract: each step's outputs (plus any refusals since the last step) go out as ONE
    CoreMsg.OUTPUTS message; a refused request gets an EngineCoreOutput with `error`; an
    exception in `step()` aborts every in-flight request and is reported as
    CoreMsg.FAILURE, and the loop serves on.
    """

    def __init__(self, engine: EngineCore, input_sock: zmq.Socket, output_sock: zmq.Socket,
                 parent_fd: int | None) -> None:
        self.engine = engine
        self.input_sock = input_sock
        self.output_sock = output_sock
        self.poller = zmq.Poller()
        self.poller.register(input_sock, zmq.POLLIN)
        self.parent_fd = parent_fd
        if parent_fd is not None:  # readable once the parent is gone
            self.poller.register(parent_fd, zmq.POLLIN)
        self.pending: list[EngineCoreOutput] = []
        self.num_steps = 0
        self.num_generated_tokens = 0

    def run(self) -> bool:
        """Serve until a shutdown message (True) or the parent's death / a fatal error (False)."""
        while True:
            idle = not self.engine.has_unfinished
            if not self._poll(timeout_ms=-1 if idle else 0):
                logger.warning("the engine client's process is gone; engine core exits")
                return False
            if not self._drain_input():
                return True
            if self.engine.has_unfinished and not self._step():
                return False
            self._flush()

    def _poll(self, timeout_ms: int) -> bool:
        """Wait for input (or not); False once the parent process has died."""
        events = dict(self.poller.poll(timeout_ms))
        return self.parent_fd is None or self.parent_fd not in events

    def _drain_input(self) -> bool:
        while True:
            try:
                data = self.input_sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            kind, payload = decode_msg(data.buffer)
            if kind == ClientMsg.ADD:
                self._add(payload)
            elif kind == ClientMsg.ABORT:
                self.engine.abort_requests(payload)
            elif kind == ClientMsg.STOP:
                for request_id, seq_index, stop_str in payload:
                    self.engine.stop_sequence(request_id, seq_index, stop_str)
            elif kind == ClientMsg.GET_STATS:
                self._flush()  # keep replies in the order the client asked
                self._send(CoreMsg.STATS, self.stats().to_wire())
            elif kind == ClientMsg.GET_KV_SNAPSHOT:
                self._flush()
                self._send(CoreMsg.KV_SNAPSHOT, self.engine.kv_snapshot())
            elif kind == ClientMsg.RESERVE_KV:
                self._flush()
                self._send(CoreMsg.KV_RESERVED, self._reserve(*payload))
            elif kind == ClientMsg.RELEASE_KV:
                self.engine.release_kv(payload)
            elif kind == ClientMsg.SHUTDOWN:
                return False
            else:
                logger.error("ignoring unknown message kind %r", kind)

    def _add(self, payload: dict[str, Any]) -> None:
        request_id = payload.get("request_id", "") if isinstance(payload, dict) else ""
        try:
            self.engine.add_request(EngineCoreRequest.from_wire(payload))
        except ValueError as exc:
            self.pending.append(EngineCoreOutput(request_id, 0, error=str(exc)))
        except Exception as exc:  # a malformed request must not take the loop down
            logger.exception("refusing request %r", request_id)
            self.pending.append(EngineCoreOutput(request_id, 0,
                                                 error=f"{type(exc).__name__}: {exc}"))

    def _reserve(self, transfer_id: str, prompt_token_ids: list[int]) -> dict[str, Any]:
        try:
            return self.engine.reserve_kv(transfer_id, prompt_token_ids)
        except NoRoomError as exc:
            return {"error": str(exc), "no_room": True}
        except ValueError as exc:
            return {"error": str(exc), "no_room": False}

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            return self._report_step_failure(exc)
        for request_id, why in self.engine.take_failures():
            self._flush()
            self._send(CoreMsg.FAILURE, EngineCoreFailure(why, [request_id], False).to_wire())
        if outputs:
            self.num_steps += 1
            self.num_generated_tokens += sum(len(o.new_token_ids) for o in outputs)
            self.pending.extend(outputs)
        return True

    def _report_step_failure(self, exc: Exception) -> bool:
        logger.exception("engine step failed; aborting every in-flight request")
        request_ids = list(self.engine.scheduler.requests)
        error = f"engine step failed: {type(exc).__name__}: {exc}"
        try:
            self.engine.abort_requests(request_ids)
            is_fatal = False
        except Exception:
            logger.exception("could not abort after a failed step; engine core exits")
            is_fatal = True
        self._flush()
        self._send(CoreMsg.FAILURE, EngineCoreFailure(error, request_ids, is_fatal).to_wire())
        return not is_fatal

    def _flush(self) -> None:
        if self.pending:
            self._send(CoreMsg.OUTPUTS, [o.to_wire() for o in self.pending])
            self.pending = []

    def _send(self, kind: str, payload: Any) -> None:
        self.output_sock.send(encode_msg(kind, payload), copy=False)

    def stats(self) -> EngineCoreStats:
        sched = self.engine.scheduler
        pool = sched.kv.pool
        prefill, decode = sched.pending_tokens()
        sender = self.engine.kv_sender
        return EngineCoreStats(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_requests=len(sched.requests), num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks, kv_usage=sched.kv.usage,
            num_preemptions=sched.num_preemptions, num_steps=self.num_steps,
            num_generated_tokens=self.num_generated_tokens,
            num_pending_prefill_tokens=prefill, num_pending_decode_tokens=decode,
            **(sender.stats() if sender is not None else {}))
