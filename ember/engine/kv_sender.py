"""Prefill role of disaggregated serving: a prompt's KV blocks are written into the blocks its
decode worker reserved as they are computed. Each step sends the blocks its chunks completed
(a long prompt goes block by block, chunk after chunk; the last chunk sends the rest), either
layer by layer while later layers compute (`layerwise`) or in one write after the forward.
Every write of a step has landed before the step's results are applied, so no block is freed
or reused under a transfer. A request whose transfer fails is reported failed; its decode
worker never adopts the reservation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from ember.kv.transfer.layout import BlockLayout, Segments

logger = logging.getLogger(__name__)

# Never start a write this close to the reservation's expiry (clock skew, write duration).
EXPIRY_MARGIN_S = 2.0


@dataclass
class _Send:
    """One request's blocks to write this step."""

    request_id: str
    seq_id: int
    peer: dict[str, Any]
    peer_layout: BlockLayout
    src: list[int]
    dst: list[int]
    expires_at: float | None
    error: str | None = None
    pending: list[Future] = field(default_factory=list)
    num_bytes: int = 0  # handed to the transport so far
    num_segments: int = 0

    def check_expiry(self) -> None:
        if self.expires_at is not None and time.time() > self.expires_at - EXPIRY_MARGIN_S:
            raise TimeoutError("the decode worker's reservation has expired (its blocks may "
                               "belong to another request now)")


class KVSender:
    def __init__(self, transport: Any, layout: BlockLayout, kv: KVCacheManager,
                 block_axis: int, layerwise: bool = True) -> None:
        self.transport = transport
        self.layout = layout  # this pool's
        self.block_axis = block_axis
        self.kv = kv
        self.layerwise = layerwise
        self.num_blocks_sent = 0
        self.num_bytes_sent = 0
        self.num_segments_sent = 0
        self.seconds_sending = 0.0  # the copies themselves, on whichever thread ran them
        self.cpu_seconds_sending = 0.0  # ... of it, on CPU (the rest: the writer preempted)
        self.seconds_waiting = 0.0  # the engine loop blocked on writes after the forward
        self.seconds_connecting = 0.0  # each decode peer's one-time set-up
        self._connected: set[str] = set()  # peers by the transport's name for them
        self._sent_upto: dict[int, int] = {}  # seq_id -> blocks already sent, mid-prompt

    def stats(self) -> dict[str, float]:
        """The sender's counters under EngineCoreStats' field names."""
        return {"kv_transfer_bytes": self.num_bytes_sent,
                "kv_transfer_seconds": self.seconds_sending,
                "kv_transfer_cpu_seconds": self.cpu_seconds_sending,
                "kv_transfer_wait_seconds": self.seconds_waiting,
                "kv_transfer_segments": self.num_segments_sent,
                "kv_transfer_connect_seconds": self.seconds_connecting}

    def plan(self, sched: SchedulerOutput) -> StepSends | None:
        """The writes of this step (None when it has none): pass `after_layer` to the forward
        when layerwise, then call `finish()` before the step's results are applied."""
        for seq_id in sched.finished_seq_ids:
            self._sent_upto.pop(seq_id, None)
        sends, failures = [], []
        for chunk in sched.chunks:
            try:
                send = self._plan_chunk(chunk)
            except Exception as err:  # a malformed target names itself
                failures.append(_failure(chunk.seq.request.request_id, err))
                continue
            if send is not None:
                sends.append(send)
        if not sends and not failures:
            return None
        return StepSends(self, sends, failures)

    def _plan_chunk(self, chunk: ScheduledChunk) -> _Send | None:
        seq = chunk.seq
        target = seq.request.kv_transfer
        if target is None or seq.index != 0 or seq.num_output_tokens != 0:
            return None
        first, dst = int(target["first_block"]), [int(b) for b in target["block_ids"]]
        is_last = bool(chunk.sample_seqs)
        computed = (chunk.start_pos + chunk.num_tokens) // self.kv.block_size
        upto = len(dst) if is_last else min(computed, len(dst))
        start = max(first, self._sent_upto.get(seq.seq_id, 0))
        if is_last:
            self._sent_upto.pop(seq.seq_id, None)
        else:
            self._sent_upto[seq.seq_id] = max(upto, start)
        if is_last and len(chunk.block_ids) < len(dst):
            raise ValueError(f"the prompt has {len(chunk.block_ids)} blocks here but "
                             f"{len(dst)} reserved")
        if upto <= start:
            return None
        expires = target.get("expires_at_unix")
        return _Send(seq.request.request_id, seq.seq_id, target["peer"],
                     BlockLayout.from_descriptor(target["peer"], self.block_axis),
                     list(chunk.block_ids[start:upto]), dst[start:upto],
                     float(expires) if expires is not None else None)

    def forget(self, seq_id: int) -> None:
        """Drop a failed sequence's progress (it is aborted; its blocks are freed)."""
        self._sent_upto.pop(seq_id, None)

    def connect(self, peer: dict[str, Any]) -> None:
        """Pay a new peer's set-up once, timed apart from the writes (a write would do it)."""
        name = self.transport.peer_name(peer)
        if name in self._connected:
            return
        start = time.perf_counter()
        self.transport.connect(peer)
        self.seconds_connecting += time.perf_counter() - start
        self._connected.add(name)


class StepSends:
    """One step's writes. Layerwise, `after_layer(i)` queues layer i's segments of every send
    (the transport copies them on its own thread while the forward goes on); `finish()` waits
    for them, and writes whatever the forward did not hand over (every layer otherwise)."""

    def __init__(self, sender: KVSender, sends: list[_Send],
                 failures: list[tuple[str, str]]) -> None:
        self.sender = sender
        self.sends = sends
        self.failures = failures
        self._layers_queued = 0
        self._busy_before = sender.transport.busy_seconds
        self._cpu_before = sender.transport.busy_cpu_seconds
        for send in sends:
            self._guard(send, sender.connect, send.peer)

    @property
    def after_layer(self) -> Callable[[int], None] | None:
        """The forward's hook, or None when this sender writes after the forward."""
        return self._queue_layer if self.sender.layerwise and self.sends else None

    def _queue_layer(self, layer: int) -> None:
        if layer != self._layers_queued:
            raise RuntimeError(f"layer {layer} finished out of order "
                               f"(expected {self._layers_queued})")
        ready = _device_ready(self.sender.transport.pool)
        for send in self.sends:
            self._guard(send, self._queue, send, layer, ready)
        self._layers_queued += 1

    def _queue(self, send: _Send, layer: int, ready: Callable[[], object] | None) -> None:
        segments = self._segments(send, [layer])
        send.pending.append(self.sender.transport.write_async(send.peer, segments, ready))

    def finish(self) -> list[tuple[str, str]]:
        """Block until every write of the step landed; (request_id, error) of failed ones."""
        sender = self.sender
        start = time.perf_counter()
        rest = list(range(self._layers_queued, sender.layout.num_layers))
        if rest and _on_gpu(sender.transport.pool):
            torch.cuda.synchronize()  # the forward's KV writes may still be queued on the GPU
        for send in self.sends:
            for done in send.pending:
                self._guard(send, done.result)
            if rest:
                self._guard(send, self._write, send, rest)
        sender.seconds_waiting += time.perf_counter() - start
        sender.seconds_sending += sender.transport.busy_seconds - self._busy_before
        sender.cpu_seconds_sending += sender.transport.busy_cpu_seconds - self._cpu_before
        for send in self.sends:
            if send.error is None:
                sender.num_blocks_sent += len(send.dst)
                sender.num_bytes_sent += send.num_bytes
                sender.num_segments_sent += send.num_segments
            else:
                sender.forget(send.seq_id)
                self.failures.append(_failure(send.request_id, send.error))
        return self.failures

    def _write(self, send: _Send, layers: list[int]) -> None:
        self.sender.transport.write(send.peer, self._segments(send, layers))

    def _segments(self, send: _Send, layers: list[int]) -> Segments:
        """The send's segments for `layers`, unless its reservation is about to expire."""
        send.check_expiry()
        segments = self.sender.layout.segments(send.src, send.dst, layers=layers,
                                               dst=send.peer_layout)
        send.num_bytes += int(segments[:, 2].sum()) if len(segments) else 0
        send.num_segments += len(segments)
        return segments

    @staticmethod
    def _guard(send: _Send, fn: Any, *args: Any) -> None:
        """Run fn unless the send already failed; its first error fails the send."""
        if send.error is not None:
            return
        try:
            fn(*args)
        except Exception as err:  # the transport's error names the peer
            send.error = str(err) or type(err).__name__


def _failure(request_id: str, err: object) -> tuple[str, str]:
    logger.warning("KV transfer for %s failed: %s", request_id, err)
    return request_id, f"KV transfer failed: {err}"


def _on_gpu(pool: torch.Tensor | None) -> bool:
    return pool is not None and pool.device.type == "cuda"


def _device_ready(pool: torch.Tensor | None) -> Callable[[], object] | None:
    """What a transfer thread waits on before reading the KV the GPU is still writing."""
    if not _on_gpu(pool):
        return None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize
