"""CpuBlockStore: KV blocks evicted from the device, kept in host memory by block hash, bounded
in bytes, least recently used out first (to the next tier, through `on_evict`).

Holds tensors; never decides what is evicted from the device or what a request reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ember.engine.block_hash import BlockHash
from ember.kv.events import KVEventRecorder


class CpuBlockStore:
    def __init__(self, capacity_bytes: int,
                 on_evict: Callable[[BlockHash, torch.Tensor], None] | None = None,
                 events: KVEventRecorder | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self.events = events
        self._blocks: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()
        self._pinned: dict[BlockHash, int] = {}  # planned loads: not evictable until done
        self.num_bytes = 0

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def hashes(self) -> list[BlockHash]:
        return list(self._blocks)

    def put(self, block_hash: BlockHash, data: torch.Tensor) -> bool:
        """Keep a block (a CPU tensor the store now owns); False if it cannot fit at all."""
        size = data.numel() * data.element_size()
        if size > self.capacity_bytes:
            return False
        if block_hash in self._blocks:
            self._blocks.move_to_end(block_hash)
            return True
        while self.num_bytes + size > self.capacity_bytes and self._evict_one():
            pass
        if self.num_bytes + size > self.capacity_bytes:
            return False  # everything left is pinned
        self._blocks[block_hash] = data
        self.num_bytes += size
        if self.events is not None:
            self.events.stored(block_hash, None, "cpu")
        return True

    def get(self, block_hash: BlockHash) -> torch.Tensor | None:
        data = self._blocks.get(block_hash)
        if data is not None:
            self._blocks.move_to_end(block_hash)
        return data

    def pin(self, block_hash: BlockHash) -> None:
        self._pinned[block_hash] = self._pinned.get(block_hash, 0) + 1

    def unpin(self, block_hash: BlockHash) -> None:
        count = self._pinned[block_hash] - 1
        if count:
            self._pinned[block_hash] = count
        else:
            del self._pinned[block_hash]

    def _evict_one(self) -> bool:
        victim = next((h for h in self._blocks if h not in self._pinned), None)
        if victim is None:
            return False
        data = self._blocks.pop(victim)
        self.num_bytes -= data.numel() * data.element_size()
        if self.events is not None:
            self.events.removed(victim, "cpu")
        if self.on_evict is not None:
            self.on_evict(victim, data)
        return True
