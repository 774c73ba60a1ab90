"""BlockPool: owns the KV cache's block ids, their reference counts and the prefix cache's
map of block hash -> block. Pure Python.

A block whose last reference goes keeps its hash and contents ("cached, free") until it is
handed out again, least recently freed first (a prompt-sized allocation as runs of consecutive
ids, see `_take_runs`); a hit takes it back out of the free queue.
It knows nothing of sequences; the KVCacheManager decides who holds which block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from ember.engine.block_hash import BlockHash
from ember.kv.events import KVEventRecorder

# Allocations of at least this many blocks (prompts, whose KV may be transferred) are taken
# as runs of consecutive ids; smaller ones strictly least recently freed first.
RUN_MIN_BLOCKS = 8
# A run may take a cached block this many times the allocation's size younger (in frees)
# than the least recently freed one: eviction stays least recently freed first within that.
RUN_SLACK_FACTOR = 4


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # NOTE: insertion order is eviction order: allocation takes the oldest free block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # when each block was last freed (a count of frees; never-used blocks before all)
        self._freed_at = list(range(-num_blocks, 0))
        self._num_frees = 0
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        self.on_evict: Callable[[int, BlockHash], None] | None = None  # before reuse
        self.events: KVEventRecorder | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out (cached but unreferenced ones included)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash_of[block_id]

    def allocate(self, num: int) -> list[int]:
        if num > len(self._free):
            raise NoFreeBlocksError(f"asked for {num} blocks, {len(self._free)} free")
        blocks = self._take_runs(num) if num >= RUN_MIN_BLOCKS else \
            [self._free.popitem(last=False)[0] for _ in range(num)]
        blocks.sort()
        for block_id in blocks:
            self._evict(block_id)
            self._ref_counts[block_id] = 1
        return blocks

    def _take_runs(self, num: int) -> list[int]:
        """`num` free blocks as runs of consecutive ids: from the least recently freed block
        up while its successors are free and worth nothing cached (no hash) or about as old
        (at most RUN_SLACK_FACTOR * num frees younger); then from the next least recently
        freed. A KV transfer copies a run in one piece per row instead of one per block."""
        taken: list[int] = []
        while len(taken) < num:
            start = next(iter(self._free))
            limit = self._freed_at[start] + RUN_SLACK_FACTOR * num
            del self._free[start]
            taken.append(start)
            block_id = start + 1
            while len(taken) < num and self._joins_run(block_id, limit):
                del self._free[block_id]
                taken.append(block_id)
                block_id += 1
        return taken

    def _joins_run(self, block_id: int, limit: int) -> bool:
        return block_id in self._free and (self._hash_of[block_id] is None
                                           or self._freed_at[block_id] <= limit)

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of[block_id]
        if block_hash is not None:
            if self.on_evict is not None:
                self.on_evict(block_id, block_hash)
            if self.events is not None:
                self.events.removed(block_hash, "device")
            del self._cached[block_hash]
            self._hash_of[block_id] = None

    def incref(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"incref of free block {block_id}"
            self._ref_counts[block_id] += 1

    def decref(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks left unreferenced become free (and stay
        cached until reused), in the order given: pass a sequence's blocks last to first so
        its tail, the least shareable part, is evicted first."""
        for block_id in block_ids:
            count = self._ref_counts[block_id] - 1
            assert count >= 0, f"decref of free block {block_id}"
            self._ref_counts[block_id] = count
            if count == 0:
                self._free[block_id] = None
                self._freed_at[block_id] = self._num_frees
                self._num_frees += 1

    # ---- the prefix cache ----------------------------------------------------------------

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def take_cached(self, block_id: int) -> None:
        """Add a reference to a cached block (a hit), taking it out of the free queue."""
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._cached)

    def cache_block(self, block_id: int, block_hash: BlockHash,
                    parent_hash: BlockHash | None = None) -> bool:
        """Record that a held, full block holds `block_hash`'s tokens; False when another
        block already holds them (this one then stays uncached)."""
        assert self._ref_counts[block_id] > 0, f"caching free block {block_id}"
        if block_hash in self._cached or self._hash_of[block_id] is not None:
            return False
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        if self.events is not None:
            self.events.stored(block_hash, parent_hash, "device")
        return True
