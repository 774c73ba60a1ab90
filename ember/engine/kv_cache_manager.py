"""KVCacheManager: each sequence's block table, growth, forking, copy-on-write and prefix-cache
hits. Pure Python.

It only does bookkeeping; the block copies it decides on are executed by the runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.engine.block_hash import BlockHash, extend_block_hashes, root_hash
from ember.engine.block_pool import BlockPool
from ember.engine.request import Sequence

if TYPE_CHECKING:
    from ember.kv.tiers import KVTiers

# match_prefix's answer for a sequence whose cached prefix is still being read from disk.
WAIT_FOR_TIERS = -1


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 cache_root: BlockHash | None = None, tiers: KVTiers | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.cache_root = cache_root if cache_root is not None else root_hash()
        self.tiers = tiers if enable_prefix_caching else None
        # Data to move this step, executed by the runner before the forward: evicted cached
        # blocks to save to the tiers, then tier blocks to load into the blocks given them.
        self.pending_saves: list[tuple[int, BlockHash]] = []
        self.pending_loads: dict[int, BlockHash] = {}
        if self.tiers is not None:
            self.pool.on_evict = self._on_evict

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.setdefault(seq_id, [])

    def allocate_slots(
        self, seq_id: int, num_computed: int, num_new_tokens: int
    ) -> list[tuple[int, int]] | None:
        """Make room to write tokens [num_computed, num_computed + num_new_tokens).

        Returns the block copies (src, dst) that copy-on-write needs, or None (and changes
        nothing) when the pool is short of blocks.
        """
        table = self.block_table(seq_id)
        num_needed = self.num_blocks_for(num_computed + num_new_tokens) - len(table)
        first = num_computed // self.block_size
        shared = [i for i in range(first, len(table)) if self.pool.ref_count(table[i]) > 1]
        if max(num_needed, 0) + len(shared) > self.pool.num_free_blocks:
            return None
        copies = []
        for i in shared:
            (new_block,) = self.pool.allocate(1)
            copies.append((table[i], new_block))
            self.pool.decref([table[i]])
            table[i] = new_block
        if num_needed > 0:
            table.extend(self.pool.allocate(num_needed))
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent; writes into shared blocks copy first."""
        assert child_id not in self.block_tables or not self.block_tables[child_id]
        table = list(self.block_tables.get(parent_id, []))
        self.pool.incref(table)
        self.block_tables[child_id] = table

    def free(self, seq_id: int) -> None:
        table = self.block_tables.pop(seq_id, None)
        if table:
            self.pool.decref(reversed(table))

    # ---- the prefix cache ----------------------------------------------------------------

    def block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[BlockHash]:
        """The sequence's chained block hashes, computed once and kept on the sequence."""
        extend_block_hashes(seq.block_hashes, self.cache_root, seq.token_ids, self.block_size,
                            num_full_blocks)
        return seq.block_hashes

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks its longest cached prefix of full blocks, from
        the device and then the lower tiers; returns how many of its tokens are computed (at
        most all but the last, whose logits are needed), or WAIT_FOR_TIERS (holding nothing)
        while part of that prefix is being read from disk. Take it back with `free` if the
        sequence cannot be scheduled after all."""
        assert not self.block_tables.get(seq.seq_id), "match_prefix on a sequence with blocks"
        if not self.enable_prefix_caching:
            return 0
        table = self.block_table(seq.seq_id)
        hashes = self.block_hashes(seq, seq.num_tokens // self.block_size)
        for block_hash in hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            self.pool.take_cached(block_id)
            table.append(block_id)
        if self.tiers is not None and len(table) < len(hashes):
            if not self._match_tiers(hashes, table):
                self.free(seq.seq_id)
                return WAIT_FOR_TIERS
        seq.num_cached_blocks = len(table)
        return min(len(table) * self.block_size, seq.num_tokens - 1)

    def _match_tiers(self, hashes: list[BlockHash], table: list[int]) -> bool:
        """Extend `table` (the device hits among `hashes`) with blocks loaded from the CPU
        tier; False (nothing changed) when some of the prefix is on disk: its reads are
        started and the caller waits."""
        assert self.tiers is not None
        start = len(table)
        found: list[BlockHash] = []
        on_disk: list[BlockHash] = []
        for block_hash in hashes[start:]:
            tier = self.tiers.tier_of(block_hash)
            if tier is None:
                break
            (on_disk if tier == "disk" else found).append(block_hash)
        if on_disk:
            self.tiers.prefetch(on_disk)
            return False
        found = found[: self.pool.num_free_blocks]
        for i, (block_id, block_hash) in enumerate(zip(self.pool.allocate(len(found)), found),
                                                   start=start):
            self.pool.cache_block(block_id, block_hash, self._parent(hashes, i))
            self.tiers.pin(block_hash)
            self.pending_loads[block_id] = block_hash
            table.append(block_id)
        return True

    def _parent(self, hashes: list[BlockHash], idx: int) -> BlockHash:
        return hashes[idx - 1] if idx > 0 else self.cache_root

    def snapshot(self) -> dict[str, list[str]]:
        """Every block hash held now, by tier (hex), for the KV-events snapshot."""
        held = {"device": [h.hex() for h in self.pool.cached_hashes()], "cpu": [], "disk": []}
        if self.tiers is not None:
            for tier, hashes in self.tiers.hashes().items():
                held[tier] = [h.hex() for h in hashes]
        return held

    def _on_evict(self, block_id: int, block_hash: BlockHash) -> None:
        loading = self.pending_loads.pop(block_id, None)
        if loading is not None:  # loaded and evicted in one step: it never held the data
            assert self.tiers is not None
            self.tiers.unpin(loading)
            return
        self.pending_saves.append((block_id, block_hash))

    def poll_tiers(self) -> None:
        if self.tiers is not None:
            self.tiers.poll()

    @property
    def is_reading_tiers(self) -> bool:
        return self.tiers is not None and self.tiers.is_reading

    def take_transfers(self) -> tuple[list[tuple[int, BlockHash]], list[tuple[int, BlockHash]]]:
        """This step's (saves, loads), handed to the runner; saves must run first."""
        saves, self.pending_saves = self.pending_saves, []
        loads, self.pending_loads = list(self.pending_loads.items()), {}
        return saves, loads

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks whose every token's KV is now computed."""
        if not self.enable_prefix_caching:
            return
        table = self.block_table(seq.seq_id)
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        if num_full <= seq.num_cached_blocks:
            return
        hashes = self.block_hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            self.pool.cache_block(table[i], hashes[i], self._parent(hashes, i))
        seq.num_cached_blocks = num_full

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks
