"""DiskBlockStore: KV blocks in files, one per block (`<hash hex>.kvb`: magic, payload length,
BLAKE2b checksum, payload), bounded in bytes, least recently used deleted first.

Writes and reads run on background threads; a missing, truncated or corrupt file is a miss
(deleted), never data. Files found at start-up are indexed, so a restarted worker starts warm.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ember.engine.block_hash import BlockHash
from ember.kv.events import KVEventRecorder

logger = logging.getLogger(__name__)

MAGIC = b"EMBERKV1"
_HEADER_BYTES = len(MAGIC) + 8 + 16
SUFFIX = ".kvb"


def encode_block(data: torch.Tensor) -> bytes:
    payload = data.contiguous().view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(payload, digest_size=16).digest()
    return MAGIC + len(payload).to_bytes(8, "little") + digest + payload


def decode_block(blob: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The block's tensor, or None when the bytes are not an intact block of this shape."""
    if len(blob) < _HEADER_BYTES or blob[:len(MAGIC)] != MAGIC:
        return None
    size = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    payload = blob[_HEADER_BYTES:]
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if size != len(payload) or size != expected:
        return None
    if hashlib.blake2b(payload, digest_size=16).digest() != blob[len(MAGIC) + 8:_HEADER_BYTES]:
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


class DiskBlockStore:
    def __init__(self, directory: str | Path, capacity_bytes: int, block_shape: tuple[int, ...],
                 dtype: torch.dtype, events: KVEventRecorder | None = None) -> None:
        self.events = events
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._index: OrderedDict[BlockHash, int] = OrderedDict()  # hash -> file bytes, LRU first
        self._pending: dict[BlockHash, torch.Tensor] = {}  # queued writes, readable meanwhile
        self.num_bytes = 0
        self._scan()
        self._writes: queue.Queue[tuple[BlockHash, torch.Tensor] | None] = queue.Queue()
        self._reads: queue.Queue[BlockHash | None] = queue.Queue()
        self._done: queue.Queue[tuple[BlockHash, torch.Tensor | None]] = queue.Queue()
        self._threads = [threading.Thread(target=self._write_loop, name="ember-kv-disk-write",
                                          daemon=True),
                         threading.Thread(target=self._read_loop, name="ember-kv-disk-read",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def _path(self, block_hash: BlockHash) -> Path:
        return self.directory / f"{block_hash.hex()}{SUFFIX}"

    def _scan(self) -> None:
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                block_hash = bytes.fromhex(path.stem)
                stat = path.stat()
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, block_hash, stat.st_size))
        for _, block_hash, size in sorted(found):
            self._index[block_hash] = size
            self.num_bytes += size
            self._event_stored(block_hash)
        self._shrink_to(self.capacity_bytes)
        if found:
            logger.info("KV disk tier: %d blocks (%.1f MiB) found in %s", len(self._index),
                        self.num_bytes / 2**20, self.directory)

    def __contains__(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return block_hash in self._index or block_hash in self._pending

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def hashes(self) -> list[BlockHash]:
        with self._lock:
            return list(self._index)

    # ---- writes --------------------------------------------------------------------------

    def put_async(self, block_hash: BlockHash, data: torch.Tensor) -> None:
        """Write a block in the background (the store owns `data` from now on)."""
        with self._lock:
            self._pending[block_hash] = data
        self._writes.put((block_hash, data))

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            block_hash, data = item
            try:
                self._write(block_hash, data)
            except OSError as exc:
                logger.warning("KV disk tier: could not write a block: %s", exc)
            finally:
                with self._lock:
                    self._pending.pop(block_hash, None)
                self._writes.task_done()
        self._writes.task_done()

    def _write(self, block_hash: BlockHash, data: torch.Tensor) -> None:
        blob = encode_block(data)
        if len(blob) > self.capacity_bytes:
            return
        path = self._path(block_hash)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        with self._lock:
            if block_hash in self._index:
                self.num_bytes -= self._index.pop(block_hash)
            else:
                self._event_stored(block_hash)
            self._index[block_hash] = len(blob)
            self.num_bytes += len(blob)
            self._shrink_to(self.capacity_bytes)

    def _shrink_to(self, capacity: int) -> None:
        while self.num_bytes > capacity and self._index:
            victim, size = self._index.popitem(last=False)
            self.num_bytes -= size
            self._path(victim).unlink(missing_ok=True)
            if self.events is not None:
                self.events.removed(victim, "disk")

    def _event_stored(self, block_hash: BlockHash) -> None:
        if self.events is not None:
            self.events.stored(block_hash, None, "disk")

    def flush(self) -> None:
        """Wait for every queued write (tests, shutdown)."""
        self._writes.join()

    # ---- reads ---------------------------------------------------------------------------

    def read(self, block_hash: BlockHash) -> torch.Tensor | None:
        """The block, or None (and the entry dropped) if its file is gone or damaged."""
        with self._lock:
            pending = self._pending.get(block_hash)
        if pending is not None:
            return pending.clone()
        try:
            blob = self._path(block_hash).read_bytes()
        except OSError:
            blob = b""
        data = decode_block(blob, self.block_shape, self.dtype)
        with self._lock:
            if data is None:
                if block_hash in self._index:
                    self.num_bytes -= self._index.pop(block_hash)
                    if self.events is not None:
                        self.events.removed(block_hash, "disk")
                    logger.warning("KV disk tier: block %s is missing or damaged; it will be "
                                   "recomputed", block_hash.hex())
                self._path(block_hash).unlink(missing_ok=True)
            elif block_hash in self._index:
                self._index.move_to_end(block_hash)
        return data

    def read_async(self, block_hash: BlockHash) -> None:
        """Read in the background; the result comes out of `completed_reads`."""
        self._reads.put(block_hash)

    def _read_loop(self) -> None:
        while (block_hash := self._reads.get()) is not None:
            self._done.put((block_hash, self.read(block_hash)))

    def completed_reads(self) -> list[tuple[BlockHash, torch.Tensor | None]]:
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def close(self) -> None:
        self._writes.put(None)
        self._reads.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
