"""BlockPool: owns the KV cache's block ids and their reference counts. Pure Python.

It knows nothing of sequences; the KVCacheManager decides who holds which block.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num: int) -> list[int]:
        if num > len(self._free):
            raise NoFreeBlocksError(f"asked for {num} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num)]
        for block_id in blocks:
            self._ref_counts[block_id] = 1
        return blocks

    def incref(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"incref of free block {block_id}"
            self._ref_counts[block_id] += 1

    def decref(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks left unreferenced return to the pool."""
        for block_id in block_ids:
            count = self._ref_counts[block_id] - 1
            assert count >= 0, f"decref of free block {block_id}"
            self._ref_counts[block_id] = count
            if count == 0:
                self._free.append(block_id)
