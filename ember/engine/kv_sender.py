"""Prefill role of disaggregated serving: once a request's prompt is computed, its KV blocks
are written into the blocks its decode worker reserved, before the step's results are applied
(so no block is freed or reused under the transfer). A request whose transfer fails is
reported failed; its decode worker never adopts the reservation."""

from __future__ import annotations

import logging
import time
from typing import Any

from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.scheduler_output import SchedulerOutput
from ember.kv.transfer.layout import BlockLayout

logger = logging.getLogger(__name__)

# Never start a write this close to the reservation's expiry (clock skew, write duration).
EXPIRY_MARGIN_S = 2.0


class KVSender:
    def __init__(self, transport: Any, layout: Any, kv: KVCacheManager,
                 block_axis: int) -> None:
        self.transport = transport
        self.layout = layout  # this pool's
        self.block_axis = block_axis
        self.kv = kv
        self.num_blocks_sent = 0
        self.num_bytes_sent = 0
        self.num_segments_sent = 0
        self.seconds_sending = 0.0  # writes only
        self.seconds_connecting = 0.0  # each decode peer's one-time set-up
        self._connected: set[str] = set()  # peers by the transport's name for them

    def stats(self) -> dict[str, float]:
        """The sender's counters under EngineCoreStats' field names."""
        return {"kv_transfer_bytes": self.num_bytes_sent,
                "kv_transfer_seconds": self.seconds_sending,
                "kv_transfer_segments": self.num_segments_sent,
                "kv_transfer_connect_seconds": self.seconds_connecting}

    def send_computed_prompts(self, sched: SchedulerOutput) -> list[tuple[str, str]]:
        """Write the KV of every prompt this step finished that has a decode target; returns
        (request_id, error) for the transfers that failed."""
        failures = []
        for chunk in sched.chunks:
            seq = chunk.seq
            target = seq.request.kv_transfer
            if target is None or not chunk.sample_seqs or seq.index != 0 \
                    or seq.num_output_tokens != 0:
                continue
            try:
                self._send(seq.seq_id, target)
            except Exception as err:  # the transport's error names the peer
                logger.warning("KV transfer for %s failed: %s", seq.request.request_id, err)
                failures.append((seq.request.request_id, f"KV transfer failed: {err}"))
        return failures

    def _send(self, seq_id: int, target: dict[str, Any]) -> None:
        expires = target.get("expires_at_unix")
        if expires is not None and time.time() > float(expires) - EXPIRY_MARGIN_S:
            raise TimeoutError("the decode worker's reservation has expired (its blocks may "
                               "belong to another request now)")
        first, dst = int(target["first_block"]), [int(b) for b in target["block_ids"]]
        src = self.kv.block_table(seq_id)[: len(dst)]
        if len(src) != len(dst):
            raise ValueError(f"the prompt has {len(src)} blocks here but {len(dst)} reserved")
        if first < len(dst):
            peer_layout = BlockLayout.from_descriptor(target["peer"], self.block_axis)
            segments = self.layout.segments(src[first:], dst[first:], dst=peer_layout)
            self._connect(target["peer"])
            start = time.perf_counter()
            self.transport.write(target["peer"], segments)
            self.seconds_sending += time.perf_counter() - start
            self.num_blocks_sent += len(dst) - first
            self.num_bytes_sent += int(segments[:, 2].sum()) if len(segments) else 0
            self.num_segments_sent += len(segments)

    def _connect(self, peer: dict[str, Any]) -> None:
        """Pay a new peer's set-up once, timed apart from the writes (a write would do it)."""
        name = self.transport.peer_name(peer)
        if name in self._connected:
            return
        start = time.perf_counter()
        self.transport.connect(peer)
        self.seconds_connecting += time.perf_counter() - start
        self._connected.add(name)
