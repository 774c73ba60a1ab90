"""KVTiers: the prefix cache below the device: host memory, then disk, by block hash.

The KV manager asks where a hash lives and requests disk reads (`tier_of`, `prefetch`, `poll`,
`pin`); the runner moves data (`save` a block the device evicts, `load` one back). Blocks the
CPU tier evicts spill to disk. It never decides what the device evicts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ember.engine.block_hash import BlockHash
from ember.kv.cpu_tier import CpuBlockStore
from ember.kv.disk_tier import DiskBlockStore
from ember.kv.events import KVEventRecorder

_MIN_STAGING_BLOCKS = 16  # host room for blocks read from disk when no CPU tier is configured


class KVTiers:
    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, *, cpu_bytes: int = 0,
                 disk_dir: str | Path | None = None, disk_bytes: int = 0,
                 events: KVEventRecorder | None = None) -> None:
        block_bytes = torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.disk = (DiskBlockStore(disk_dir, disk_bytes, block_shape, dtype, events)
                     if disk_dir is not None and disk_bytes > 0 else None)
        if self.disk is not None:
            cpu_bytes = max(cpu_bytes, _MIN_STAGING_BLOCKS * block_bytes)
        self.cpu = CpuBlockStore(cpu_bytes, on_evict=self._spill, events=events)
        self._reading: set[BlockHash] = set()

    def _spill(self, block_hash: BlockHash, data: torch.Tensor) -> None:
        if self.disk is not None:
            self.disk.put_async(block_hash, data)

    # ---- the KV manager's side (no tensors) ----------------------------------------------

    def tier_of(self, block_hash: BlockHash) -> str | None:
        """"cpu" (loadable now), "disk" (needs a read first), or None."""
        if block_hash in self.cpu:
            return "cpu"
        if self.disk is not None and (block_hash in self._reading or block_hash in self.disk):
            return "disk"
        return None

    def prefetch(self, block_hashes: list[BlockHash]) -> None:
        """Start reading these blocks from disk into the CPU tier (once each)."""
        assert self.disk is not None
        for block_hash in block_hashes:
            if block_hash not in self._reading:
                self._reading.add(block_hash)
                self.disk.read_async(block_hash)

    def poll(self) -> None:
        """Move finished disk reads into the CPU tier (a damaged block is simply gone)."""
        if self.disk is None:
            return
        for block_hash, data in self.disk.completed_reads():
            self._reading.discard(block_hash)
            if data is not None:
                self.cpu.put(block_hash, data)

    @property
    def is_reading(self) -> bool:
        return bool(self._reading)

    def pin(self, block_hash: BlockHash) -> None:
        """Keep a CPU block until `load` takes it (it was promised to a request)."""
        self.cpu.pin(block_hash)

    def unpin(self, block_hash: BlockHash) -> None:
        self.cpu.unpin(block_hash)

    # ---- the runner's side ---------------------------------------------------------------

    def save(self, block_hash: BlockHash, data: torch.Tensor) -> None:
        """Keep a block the device is evicting (`data`: a host copy the tiers now own)."""
        if not self.cpu.put(block_hash, data):
            self._spill(block_hash, data)

    def load(self, block_hash: BlockHash) -> torch.Tensor:
        """A pinned CPU block's data (unpinned on return)."""
        data = self.cpu.get(block_hash)
        self.cpu.unpin(block_hash)
        assert data is not None, "a pinned block left the CPU tier"
        return data

    def hashes(self) -> dict[str, list[BlockHash]]:
        return {"cpu": self.cpu.hashes(), "disk": self.disk.hashes() if self.disk else []}

    def close(self) -> None:
        if self.disk is not None:
            self.disk.flush()
            self.disk.close()
