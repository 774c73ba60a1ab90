"""The router's view of which worker caches which KV blocks: an exact index fed by the
workers' KV events (`KVIndex`, `KVEventSubscriber`) and an approximate one of what was routed
where, for workers that publish none (`ApproxPrefixIndex`). Answers queries; picks no worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from ember.kv.events import TIERS, TOPIC

logger = logging.getLogger(__name__)

# A worker may hold one block in several tiers at once (a device block with a CPU copy): its
# tiers are a bit mask, and a query reports the fastest one.
_TIER_BIT = {tier: 1 << i for i, tier in enumerate(TIERS)}
_BEST_TIER = [None] + [TIERS[(mask & -mask).bit_length() - 1]
                       for mask in range(1, 1 << len(TIERS))]


def _leading_runs(entries: dict[str, dict[str, Any]], block_hashes: list[str],
                  tier_of: Callable[[Any], str]) -> dict[str, list[str]]:
    """For each worker, the tiers of the longest leading run of block_hashes it holds.

    NOTE: on the hot path (every request, every worker): the walk narrows the matching set
    with C-level set operations, and blocks whose holders all keep them in the same tier share
    one list of tiers, so a worker's answer is usually a slice of it."""
    walked: list[dict[str, Any]] = []  # holders of each block in the common run
    lengths: dict[str, int] = {}  # worker -> blocks matched, once it stops matching
    matching: set[str] = set()
    for idx, block_hash in enumerate(block_hashes):
        holders = entries.get(block_hash)
        if not holders:
            break
        if idx == 0:
            matching = set(holders)
        else:
            still = matching.intersection(holders)
            for worker_id in matching - still:
                lengths[worker_id] = idx
            matching = still
            if not matching:
                break
        walked.append(holders)
    for worker_id in matching:
        lengths[worker_id] = len(walked)
    return _tiers_by_worker(walked, lengths, tier_of)


def _tiers_by_worker(walked: list[dict[str, Any]], lengths: dict[str, int],
                     tier_of: Callable[[Any], str]) -> dict[str, list[str]]:
    shared: list[str] = []  # tiers of the leading blocks all of whose holders agree
    for holders in walked:
        values = set(holders.values())
        if len(values) != 1:
            break
        shared.append(tier_of(next(iter(values))))
    runs = {}
    for worker_id, num in lengths.items():
        if num <= len(shared):
            runs[worker_id] = shared[:num]
        else:
            runs[worker_id] = shared + [tier_of(walked[j][worker_id])
                                        for j in range(len(shared), num)]
    return runs


class KVIndex:
    """Block hash (hex) → {worker_id: tiers}, kept from each worker's snapshot plus its
    numbered event batches. Not thread-safe: one asyncio loop owns it."""

    def __init__(self) -> None:
        self._holders: dict[str, dict[str, int]] = {}  # hash -> {worker_id: tier mask}
        self._held: dict[str, dict[str, int]] = {}  # worker_id -> {hash: tier mask}
        self._last_seq: dict[str, int] = {}
        self._is_caught_up: dict[str, bool] = {}  # a batch above the snapshot was applied

    def apply_snapshot(self, worker_id: str, snapshot: dict[str, Any]) -> None:
        """Replace everything known about worker_id with a `/kv_cache/snapshot` body."""
        self.remove_worker(worker_id)
        self._held[worker_id] = {}
        for tier, hashes in snapshot["tiers"].items():
            self._store(worker_id, hashes, tier)
        self._last_seq[worker_id] = int(snapshot["seq"])
        self._is_caught_up[worker_id] = False

    def apply_batch(self, worker_id: str, batch: dict[str, Any]) -> bool:
        """Apply one event batch. False (and nothing applied) when its seq is not the next one
        expected, or when the worker has no snapshot yet: the caller must resync.

        NOTE: batches at or below the snapshot's seq that arrive before any newer one are
        already in the snapshot and are skipped; after that a seq going back means the worker
        restarted (its numbering starts again at 1), so it is a gap too."""
        last = self._last_seq.get(worker_id)
        if last is None:
            return False
        seq = int(batch["seq"])
        if seq <= last and not self._is_caught_up[worker_id]:
            return True
        if seq != last + 1:
            return False
        for event in batch["events"]:
            if event["type"] == "stored":
                self._store(worker_id, event["block_hashes"], event["tier"])
            else:
                self._remove(worker_id, event["block_hashes"], event["tier"])
        self._last_seq[worker_id] = seq
        self._is_caught_up[worker_id] = True
        return True

    def remove_worker(self, worker_id: str) -> None:
        for block_hash in self._held.pop(worker_id, {}):
            holders = self._holders[block_hash]
            del holders[worker_id]
            if not holders:
                del self._holders[block_hash]
        self._last_seq.pop(worker_id, None)
        self._is_caught_up.pop(worker_id, None)

    def prefix_match(self, block_hashes: list[str]) -> dict[str, list[str]]:
        """{worker_id: tier of each block of the longest leading run of block_hashes it holds}
        (its fastest tier per block); workers holding none of the first block are absent."""
        return _leading_runs(self._holders, block_hashes, _BEST_TIER.__getitem__)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def __len__(self) -> int:
        """Distinct block hashes held by any worker."""
        return len(self._holders)

    def last_seq(self, worker_id: str) -> int | None:
        return self._last_seq.get(worker_id)

    def blocks(self, worker_id: str) -> dict[str, set[str]]:
        """{tier: block hashes} held by worker_id: the shape `apply_events` keeps."""
        held: dict[str, set[str]] = {tier: set() for tier in TIERS}
        for block_hash, mask in self._held.get(worker_id, {}).items():
            for tier, bit in _TIER_BIT.items():
                if mask & bit:
                    held[tier].add(block_hash)
        return held

    def _store(self, worker_id: str, hashes: list[str], tier: str) -> None:
        bit, held = _TIER_BIT[tier], self._held[worker_id]
        for block_hash in hashes:
            mask = held.get(block_hash, 0) | bit
            held[block_hash] = mask
            self._holders.setdefault(block_hash, {})[worker_id] = mask

    def _remove(self, worker_id: str, hashes: list[str], tier: str) -> None:
        bit, held = _TIER_BIT[tier], self._held[worker_id]
        for block_hash in hashes:
            mask = held.get(block_hash, 0) & ~bit
            if mask:
                held[block_hash] = mask
                self._holders[block_hash][worker_id] = mask
            elif block_hash in held:
                del held[block_hash]
                holders = self._holders[block_hash]
                del holders[worker_id]
                if not holders:
                    del self._holders[block_hash]


class ApproxPrefixIndex:
    """What the router sent where, for workers that publish no KV events: each worker keeps
    the max_blocks block hashes it was most recently sent (all assumed on "device")."""

    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._holders: dict[str, dict[str, bool]] = {}  # hash -> {worker_id: True}
        self._held: dict[str, OrderedDict[str, None]] = {}  # worker_id -> LRU of hashes

    def record(self, worker_id: str, block_hashes: list[str]) -> None:
        held = self._held.setdefault(worker_id, OrderedDict())
        # NOTE: touched last block first, so a prefix's head is the most recent and the LRU
        # evicts tails before the blocks that every longer match needs.
        for block_hash in reversed(block_hashes):
            if block_hash in held:
                held.move_to_end(block_hash)
            else:
                held[block_hash] = None
                self._holders.setdefault(block_hash, {})[worker_id] = True
        while len(held) > self.max_blocks:
            old, _ = held.popitem(last=False)
            self._drop(old, worker_id)

    def remove_worker(self, worker_id: str) -> None:
        for block_hash in self._held.pop(worker_id, {}):
            self._drop(block_hash, worker_id)

    def prefix_match(self, block_hashes: list[str]) -> dict[str, list[str]]:
        return _leading_runs(self._holders, block_hashes, lambda _: "device")

    def num_blocks(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def __len__(self) -> int:
        return len(self._holders)

    def _drop(self, block_hash: str, worker_id: str) -> None:
        holders = self._holders[block_hash]
        del holders[worker_id]
        if not holders:
            del self._holders[block_hash]


SnapshotFetcher = Callable[[], Awaitable[dict[str, Any]]]


def http_snapshot_fetcher(worker_url: str, headers: dict[str, str] | None = None,
                          timeout_s: float = 10.0) -> SnapshotFetcher:
    """GET {worker_url}/kv_cache/snapshot with aiohttp (one short-lived session per call)."""
    import aiohttp

    url = worker_url.rstrip("/") + "/kv_cache/snapshot"

    async def fetch() -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            async with session.get(url) as resp:
                resp.raise_for_status()
                return await resp.json()

    return fetch


class KVEventSubscriber:
    """Keeps one worker's entries in a KVIndex: subscribe, then snapshot, then batches,
    resyncing on a gap or after idle_resync_s without a batch. `run()` never raises on a dead
    worker: it drops that worker's entries, logs, and retries with backoff until `close()`."""

    def __init__(self, worker_id: str, endpoint: str, index: KVIndex,
                 fetch_snapshot: SnapshotFetcher, *, idle_resync_s: float = 30.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        self.worker_id, self.endpoint, self.index = worker_id, endpoint, index
        self.fetch_snapshot = fetch_snapshot
        self.idle_resync_s, self.backoff_s, self.max_backoff_s = (
            idle_resync_s, backoff_s, max_backoff_s)
        self.num_resyncs = 0  # snapshots applied, the first one included
        self.num_batches = 0
        self._closed = asyncio.Event()

    async def run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        # NOTE: subscribed before the snapshot, so batches sent meanwhile queue here; one sent
        # before the connection is up is lost, and the next batch's gap triggers a resync.
        sock.connect(self.endpoint)
        backoff = self.backoff_s
        try:
            while not self._closed.is_set():
                if not await self._resync():
                    await self._wait_closed(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                backoff = self.backoff_s
                await self._follow(sock)
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._closed.set()

    async def _resync(self) -> bool:
        try:
            snapshot = await self.fetch_snapshot()
        except Exception as e:  # a dead or restarting worker: retried by run()
            logger.warning("kv snapshot from %s failed: %r", self.worker_id, e)
            self.index.remove_worker(self.worker_id)
            return False
        self.index.apply_snapshot(self.worker_id, snapshot)
        self.num_resyncs += 1
        return True

    async def _follow(self, sock: Any) -> None:
        """Apply batches until a gap, idle_resync_s of silence, or close()."""
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            while not self._closed.is_set():
                recv = asyncio.ensure_future(sock.recv_multipart())
                done, _ = await asyncio.wait({recv, closed}, timeout=self.idle_resync_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    return
                try:
                    batch = msgpack.unpackb(recv.result()[-1], raw=False)
                    is_applied = self.index.apply_batch(self.worker_id, batch)
                except Exception as e:  # a malformed batch: trust nothing until a snapshot
                    logger.warning("bad kv event batch from %s: %r", self.worker_id, e)
                    return
                if not is_applied:
                    logger.info("kv events from %s: gap at seq %s, resyncing",
                                self.worker_id, batch["seq"])
                    return
                self.num_batches += 1
        finally:
            closed.cancel()

    async def _wait_closed(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._closed.wait(), timeout_s)
        except TimeoutError:
            pass
