"""KVCacheManager: each sequence's block table, growth, forking and copy-on-write. Pure Python.

It only does bookkeeping; the block copies it decides on are executed by the runner.
"""

from __future__ import annotations

from ember.engine.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int]] = {}

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
            self.pool.decref(table)

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks
