"""DiskBlockStore: bit-exact round trips, damaged or missing files are misses (never data),
bounded bytes, and a new store over the same directory starts warm."""

from __future__ import annotations

import torch

from ember.kv.disk_tier import SUFFIX, DiskBlockStore, decode_block, encode_block

SHAPE = (2, 3, 4)


def _block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _store(tmp_path, capacity=1 << 20):
    return DiskBlockStore(tmp_path, capacity, SHAPE, torch.bfloat16)


def test_round_trip_is_bit_exact_and_survives_a_restart(tmp_path):
    store = _store(tmp_path)
    blocks = {bytes([i]) * 16: _block(i) for i in range(5)}
    for block_hash, data in blocks.items():
        store.put_async(block_hash, data)
        assert block_hash in store  # readable while the write is queued
    store.flush()
    for block_hash, data in blocks.items():
        assert torch.equal(store.read(block_hash).view(torch.int16), data.view(torch.int16))
    store.close()
    again = _store(tmp_path)  # a restarted worker
    assert set(again.hashes()) == set(blocks)
    again.read_async(bytes([3]) * 16)
    while not (done := again.completed_reads()):
        pass
    assert torch.equal(done[0][1], blocks[bytes([3]) * 16])
    again.close()


def test_corrupt_truncated_and_missing_files_are_misses(tmp_path):
    store = _store(tmp_path)
    names = [bytes([i]) * 16 for i in range(3)]
    for i, block_hash in enumerate(names):
        store.put_async(block_hash, _block(i))
    store.flush()
    files = {h: tmp_path / f"{h.hex()}{SUFFIX}" for h in names}
    blob = bytearray(files[names[0]].read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the payload
    files[names[0]].write_bytes(bytes(blob))
    files[names[1]].write_bytes(files[names[1]].read_bytes()[:-7])  # truncated
    files[names[2]].unlink()  # deleted behind our back
    for block_hash in names:
        assert store.read(block_hash) is None
        assert block_hash not in store
    assert not any(path.exists() for path in files.values())
    assert store.num_bytes == 0
    store.close()


def test_capacity_deletes_least_recently_used_files(tmp_path):
    size = len(encode_block(_block(0)))
    store = _store(tmp_path, capacity=3 * size)
    for i in range(3):
        store.put_async(bytes([i]) * 16, _block(i))
    store.flush()
    store.read(bytes([0]) * 16)  # touch: 1 is now the oldest
    store.put_async(bytes([9]) * 16, _block(9))
    store.flush()
    assert set(store.hashes()) == {bytes([i]) * 16 for i in (0, 2, 9)}
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 3 and store.num_bytes == 3 * size
    store.close()


def test_decode_rejects_a_block_of_another_shape():
    blob = encode_block(_block(1))
    assert decode_block(blob, SHAPE, torch.bfloat16) is not None
    assert decode_block(blob, (2, 3, 5), torch.bfloat16) is None
    assert decode_block(b"EMBERKV1", SHAPE, torch.bfloat16) is None
