"""KVTransport: the one interface every KV-transfer backend implements, and `make_transport`.

A transport registers this process's KV pool, describes it to peers (a JSON-able dict), and
writes byte segments of its own pool into a peer's pool. It knows nothing of requests or blocks.
"""

from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar

import numpy as np
import torch

from ember.kv.transfer.deadline import DeadlineWatch
from ember.kv.transfer.layout import Segments, as_segments

DESCRIPTOR_VERSION = 1
_BACKENDS = {"mooncake": "ember.kv.transfer.mooncake:MooncakeTransport",
             "shm": "ember.kv.transfer.shm:ShmTransport"}


class KVTransferError(RuntimeError):
    """A transfer failed or timed out; the message names the peer."""


class KVTransport(ABC):
    """Contract:

    * `register(pool)` once, before `descriptor()` or any write; the pool must stay alive and
      contiguous until `close()`.
    * `connect(peer)` (optional) pays a peer's one-time set-up before the first write.
    * `write(peer, segments)` copies pool[src:src+n] to peer_pool[dst:dst+n] for each
      (src, dst, n) and returns when all landed, or raises KVTransferError naming the peer
      within `timeout_s`. `write_async` returns a Future completing the same way (done or
      KVTransferError within `timeout_s`); writes run one at a time, in submission order
      (a blocking write of an `inline_writes` backend runs on the caller's thread).
      `write_async(..., ready=fn)` calls `fn()` on the worker thread before copying (a CUDA
      event's synchronize, so a write never reads KV the GPU has not finished).
    * `busy_seconds`: the time spent copying, on any thread (what GB/s figures divide by);
      `busy_cpu_seconds`: the CPU time of the threads that ran those writes (for shm, the
      copies themselves). Less than `busy_seconds` by the time the writer was preempted.
    * NOTE: after a timeout the copy may still land until the backend gives up on its own
      (Mooncake 0.3.13: each synchronous batch waits at most ~5 s); a destination must not
      reuse the blocks of a failed write before then.
    * `close()` is idempotent; it waits for the write in progress and drops queued ones.
    """

    name: ClassVar[str]
    peer_fields: ClassVar[tuple[str, ...]] = ()  # descriptor fields a writer needs
    # A backend whose writes cannot hang (a memcpy into a mapping) runs blocking writes on the
    # caller's thread: two thread hand-offs cost ~0.3 ms here, as long as a 4 MB copy.
    inline_writes: ClassVar[bool] = False

    def __init__(self, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.pool: torch.Tensor | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-{self.name}")
        self._deadlines = DeadlineWatch()
        self._closed = False
        self._io_lock = threading.Lock()  # one _write/_connect at a time, on any thread
        self._queue_lock = threading.Lock()
        self._num_queued = 0  # async writes submitted and not finished
        self.busy_seconds = 0.0
        self.busy_cpu_seconds = 0.0

    def register(self, pool: torch.Tensor) -> None:
        """Make `pool` (this process's whole KV pool) the source and target of transfers."""
        if self.pool is not None:
            raise KVTransferError(f"{self.name}: a pool is already registered")
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be contiguous")
        self._register(pool)
        self.pool = pool

    def descriptor(self) -> dict[str, Any]:
        """What a peer needs to write into this process's pool (JSON-serialisable)."""
        pool = self._require_pool()
        return {"backend": self.name, "version": DESCRIPTOR_VERSION,
                "nbytes": pool.numel() * pool.element_size(), "shape": list(pool.shape),
                "dtype": _dtype_name(pool),
                "element_size": pool.element_size(), **self._endpoint()}

    def connect(self, peer: dict[str, Any]) -> None:
        """Set up what writes to `peer` need (a mapping, a handshake) ahead of the first write,
        so its one-time cost is paid and counted apart from the transfers; idempotent."""
        self._check(peer, [])
        if self.inline_writes:
            with self._io_lock:
                self._connect(peer)
            return
        done = self._executor.submit(self._locked, self._connect, peer)
        try:
            done.result(timeout=self.timeout_s)
        except FutureTimeout as err:
            raise KVTransferError(f"{self.name}: connecting to peer {self.peer_name(peer)} "
                                  f"timed out after {self.timeout_s:g} s") from err

    def write(self, peer: dict[str, Any], segments: Segments | list[tuple[int, int, int]]
              ) -> None:
        """Blocking write; raises KVTransferError naming the peer on failure or timeout."""
        if self.inline_writes and self._num_queued == 0:  # else after the queued ones
            checked = self._check(peer, segments)
            with self._io_lock:
                self._timed_write(peer, checked)
            return
        self.write_async(peer, segments).result()

    def write_async(self, peer: dict[str, Any],
                    segments: Segments | list[tuple[int, int, int]],
                    ready: Callable[[], object] | None = None) -> Future[None]:
        """Queue a write on the transport's worker thread; the Future completes with None or
        KVTransferError within `timeout_s`. Bad arguments raise here, before queueing."""
        checked = self._check(peer, segments)
        outer: Future[None] = Future()
        with self._queue_lock:
            self._num_queued += 1
        inner = self._executor.submit(self._queued_write, peer, checked, ready)
        inner.add_done_callback(lambda done: _relay(done, outer))
        self._deadlines.watch(outer, self.timeout_s, KVTransferError(
            f"{self.name}: write of {total_bytes(checked)} bytes to peer "
            f"{self.peer_name(peer)} timed out after {self.timeout_s:g} s"))
        return outer

    def _locked(self, fn: Any, *args: Any) -> None:
        with self._io_lock:
            fn(*args)

    def _queued_write(self, peer: dict[str, Any], segments: Segments,
                      ready: Callable[[], object] | None) -> None:
        try:
            if ready is not None:
                ready()
            self._locked(self._timed_write, peer, segments)
        finally:
            with self._queue_lock:
                self._num_queued -= 1

    def _timed_write(self, peer: dict[str, Any], segments: Segments) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            self._write(peer, segments)
        finally:
            self.busy_seconds += time.perf_counter() - start
            self.busy_cpu_seconds += time.thread_time() - cpu_start

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._deadlines.close()
        self._close()

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def peer_name(self, peer: dict[str, Any]) -> str:
        """How errors name the peer."""

    @abstractmethod
    def _register(self, pool: torch.Tensor) -> None: ...

    @abstractmethod
    def _endpoint(self) -> dict[str, Any]:
        """The backend's own descriptor fields (where and how to reach the pool)."""

    @abstractmethod
    def _write(self, peer: dict[str, Any], segments: Segments) -> None:
        """Copy the segments; runs on the worker thread; raises KVTransferError."""

    @abstractmethod
    def _close(self) -> None: ...

    def _connect(self, peer: dict[str, Any]) -> None:
        """Backends with per-peer set-up do it here; the first write does it otherwise."""
        return None

    def _require_pool(self) -> torch.Tensor:
        if self.pool is None:
            raise KVTransferError(f"{self.name}: register() the local KV pool first")
        return self.pool

    def _check(self, peer: dict[str, Any], segments: Segments | list) -> Segments:
        if self._closed:
            raise KVTransferError(f"{self.name}: transport is closed")
        pool = self._require_pool()
        if not isinstance(peer, dict) or peer.get("backend") != self.name:
            got = peer.get("backend") if isinstance(peer, dict) else type(peer).__name__
            raise KVTransferError(f"{self.name}: peer descriptor is for backend {got!r}")
        if peer.get("version") != DESCRIPTOR_VERSION:
            raise KVTransferError(f"{self.name}: peer descriptor version {peer.get('version')!r}"
                                  f", this ember speaks {DESCRIPTOR_VERSION}")
        missing = [f for f in ("nbytes", *self.peer_fields) if f not in peer]
        if missing:
            raise KVTransferError(f"{self.name}: peer descriptor lacks field(s) {missing}")
        dtype = _dtype_name(pool)
        if peer.get("dtype", dtype) != dtype:  # same sizes (e4m3 vs e5m2) would copy garbage
            raise KVTransferError(f"{self.name}: peer {self.peer_name(peer)} keeps its KV cache "
                                  f"in {peer['dtype']}, this worker in {dtype} (set the same "
                                  f"--kv-cache-dtype on both)")
        checked = as_segments(segments)
        _check_bounds(checked, pool.numel() * pool.element_size(), int(peer["nbytes"]),
                      self.peer_name(peer))
        return checked


def _dtype_name(pool: torch.Tensor) -> str:
    return str(pool.dtype).removeprefix("torch.")


def _check_bounds(segments: Segments, local_bytes: int, peer_bytes: int, peer: str) -> None:
    if segments.size == 0:
        return
    src, dst, nbytes = segments[:, 0], segments[:, 1], segments[:, 2]
    if (nbytes <= 0).any() or (src < 0).any() or (dst < 0).any():
        raise KVTransferError(f"segments to peer {peer}: negative offset or empty length")
    if int((src + nbytes).max()) > local_bytes:
        raise KVTransferError(f"segments to peer {peer} read past the local pool "
                              f"({local_bytes} bytes)")
    if int((dst + nbytes).max()) > peer_bytes:
        raise KVTransferError(f"segments write past peer {peer}'s pool ({peer_bytes} bytes)")


def _relay(done: Future, outer: Future) -> None:
    error = done.exception()
    try:
        if error is None:
            outer.set_result(None)
        else:
            outer.set_exception(error)
    except InvalidStateError:  # the deadline already failed it
        pass


def make_transport(name: str, **options: Any) -> KVTransport:
    """A transport by backend name ("mooncake" or "shm"), constructed with `options`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown KV transport {name!r}; known: {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


def total_bytes(segments: Segments) -> int:
    return int(np.asarray(segments)[:, 2].sum()) if len(segments) else 0
