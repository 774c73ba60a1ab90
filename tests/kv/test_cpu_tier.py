"""CpuBlockStore: bounded bytes, least recently used out first (to on_evict), pins hold."""

from __future__ import annotations

import torch

from ember.kv.cpu_tier import CpuBlockStore


def _block(value: float) -> torch.Tensor:
    return torch.full((4, 4), float(value))  # 64 bytes of float32


def test_lru_eviction_spills_to_the_next_tier_and_pins_hold():
    spilled = []
    store = CpuBlockStore(3 * 64, on_evict=lambda h, d: spilled.append((h, d[0, 0].item())))
    for i in range(3):
        assert store.put(bytes([i]), _block(i))
    store.get(b"\x00")  # touch: 1 is now the oldest
    store.pin(b"\x01")
    assert store.put(b"\x03", _block(3))
    assert spilled == [(b"\x02", 2.0)]  # 1 is pinned, so 2 went
    store.unpin(b"\x01")
    store.put(b"\x04", _block(4))
    assert spilled[-1] == (b"\x01", 1.0)
    assert store.num_bytes == 3 * 64 and len(store) == 3
    assert not store.put(b"big", torch.zeros(100))  # larger than the whole tier
