"""BlockPool allocation order: least recently freed first, handed out in id order so blocks
freed together come back as runs of consecutive ids."""

from __future__ import annotations

import pytest

from ember.engine.block_pool import RUN_MIN_BLOCKS, BlockPool, NoFreeBlocksError


def test_fresh_pool_hands_out_consecutive_ids() -> None:
    pool = BlockPool(16)
    assert pool.allocate(5) == [0, 1, 2, 3, 4]
    assert pool.allocate(3) == [5, 6, 7]


def test_least_recently_freed_first_in_id_order() -> None:
    pool = BlockPool(12)
    first, second = pool.allocate(4), pool.allocate(4)
    pool.decref(reversed(first))  # a sequence frees its tail first
    pool.decref(reversed(second))
    # the never-used blocks 8..11 are oldest, then `first`'s tail to head, then `second`'s
    assert pool.allocate(6) == [2, 3, 8, 9, 10, 11]
    assert pool.allocate(6) == [0, 1, 4, 5, 6, 7]
    assert pool.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError, match="asked for 1 blocks, 0 free"):
        pool.allocate(1)


def test_cached_blocks_are_evicted_in_least_recently_freed_order() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, block in enumerate(blocks):
        assert pool.cache_block(block, f"h{i}".encode())
    pool.decref([3, 2, 1, 0])
    evicted = []
    pool.on_evict = lambda block, block_hash: evicted.append(block_hash)
    assert pool.allocate(2) == [2, 3]
    assert sorted(evicted) == [b"h2", b"h3"]
    assert pool.lookup(b"h1") == 1 and pool.lookup(b"h3") is None


def test_large_allocations_take_runs_of_consecutive_ids() -> None:
    pool = BlockPool(24)
    streams: list[list[int]] = [[], [], []]
    for _ in range(8):  # three sequences growing a block at a time: interleaved ids
        for table in streams:
            table += pool.allocate(1)
    pool.decref(reversed(streams[0]))
    pool.decref(reversed(streams[1]))
    assert RUN_MIN_BLOCKS <= 8
    # the 8 least recently freed are streams[0]'s (every third id, no two adjacent); their
    # free successors from streams[1] come along instead, in pairs
    assert pool.allocate(8) == [12, 13, 15, 16, 18, 19, 21, 22]
    assert pool.allocate(4) == [0, 3, 6, 9]  # small: strictly least recently freed


def test_runs_never_evict_a_recently_freed_cached_block_early() -> None:
    pool = BlockPool(64)
    prompt = pool.allocate(7)
    for i, block in enumerate(prompt):
        pool.cache_block(block, f"p{i}".encode())
    pool.decref(reversed(prompt))
    # never-used blocks are older: the next prompt runs over them, not over the cached ones
    assert pool.allocate(8) == list(range(7, 15))
    assert all(pool.lookup(f"p{i}".encode()) == i for i in range(7))


def test_runs_take_cached_neighbours_only_about_as_old() -> None:
    pool = BlockPool(32)
    blocks = pool.allocate(32)
    for block in blocks:
        pool.cache_block(block, f"b{block}".encode())
    pool.decref([0, 8])  # the two oldest
    pool.decref(range(1, 8))  # 1..7: within 4 * 8 frees of block 0
    pool.decref(range(9, 32))
    taken = pool.allocate(8)
    assert taken == list(range(8))  # block 0's run, not strictly 0, 8, 1, 2, ...
    assert pool.lookup(b"b8") == 8  # still cached: only the run's blocks were evicted


def test_runs_skip_cached_neighbours_much_younger() -> None:
    pool = BlockPool(64)
    blocks = pool.allocate(64)
    for block in blocks:
        pool.cache_block(block, f"b{block}".encode())
    pool.decref([0])
    pool.decref(range(20, 64))  # 44 frees
    pool.decref(range(1, 20))  # block 1 is 45 frees younger than block 0: more than 4 * 8
    assert pool.allocate(8) == [0, 20, 21, 22, 23, 24, 25, 26]
    assert pool.lookup(b"b1") == 1
