"""KV events: which block hashes a worker holds, and in which tier, as they change.

`KVEventRecorder` collects `stored` / `removed` events from the block pool and the tiers
(thread-safe: disk writes finish on their own thread); `KVEventPublisher` sends them once per
engine step on a ZeroMQ PUB socket as numbered batches, so a subscriber (the router) can
replay them, notice a gap, and resync from the snapshot.

Wire format, one multipart message per batch: [b"kv", seq (8 bytes, big-endian), msgpack of
{"seq", "ts", "events": [{"type": "stored" | "removed", "block_hashes": [hex, ...],
"parent_hash": hex | None (stored on "device" only), "tier": "device" | "cpu" | "disk"}]}].
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack

from ember.engine.block_hash import BlockHash

TOPIC = b"kv"
TIERS = ("device", "cpu", "disk")


class KVEventRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []

    def stored(self, block_hash: BlockHash, parent_hash: BlockHash | None, tier: str) -> None:
        event = {"type": "stored", "block_hashes": [block_hash.hex()],
                 "parent_hash": parent_hash.hex() if parent_hash is not None else None,
                 "tier": tier}
        with self._lock:
            self._events.append(event)

    def removed(self, block_hash: BlockHash, tier: str) -> None:
        with self._lock:
            self._events.append({"type": "removed", "block_hashes": [block_hash.hex()],
                                 "tier": tier})

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class KVEventPublisher:
    """Binds a PUB socket (e.g. "tcp://127.0.0.1:5557") and sends one batch per flush."""

    def __init__(self, endpoint: str, recorder: KVEventRecorder) -> None:
        import zmq

        self.recorder = recorder
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.seq = 0

    def flush(self) -> None:
        events = self.recorder.drain()
        if not events:
            return
        self.seq += 1
        batch = {"seq": self.seq, "ts": time.time(), "events": events}
        self._sock.send_multipart([TOPIC, self.seq.to_bytes(8, "big"),
                                   msgpack.packb(batch, use_bin_type=True)])

    def close(self) -> None:
        self.flush()
        self._sock.close()


def apply_events(state: dict[str, set[str]], events: list[dict[str, Any]]) -> None:
    """Replay events into {tier: set of block hashes (hex)}: what a subscriber keeps."""
    for event in events:
        held = state.setdefault(event["tier"], set())
        if event["type"] == "stored":
            held.update(event["block_hashes"])
        else:
            held.difference_update(event["block_hashes"])
