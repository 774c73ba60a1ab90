"""Shared-memory pools: zeroed, mapped by path, unlinked on close, stale files of dead processes
removed; the transport refuses peers it cannot reach."""

from __future__ import annotations

import mmap
import subprocess

import numpy as np
import pytest
import torch

from ember.kv.transfer import KVTransferError, make_transport
from ember.kv.transfer.shm import SHM_DIR, SharedKVPool, shared_kv_pool
from tests.kv.transfer.peer import SHAPE


def test_pool_is_zeroed_shared_and_unlinked_on_close() -> None:
    shared = shared_kv_pool(SHAPE, torch.bfloat16)
    assert shared.tensor.shape == SHAPE and not shared.tensor.any()
    shared.tensor[1, 0, 3].fill_(2.5)
    with open(shared.path, "r+b") as f:  # what a peer maps sees our writes
        other = np.frombuffer(mmap.mmap(f.fileno(), 0), dtype=np.uint8)
    assert np.array_equal(other, shared.tensor.view(-1).view(torch.uint8).numpy())
    assert SharedKVPool.owning(shared.tensor[2]) is shared
    shared.close()
    shared.close()
    assert not shared.path.exists()
    assert SharedKVPool.owning(shared.tensor) is None


def test_files_of_dead_processes_are_removed() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = SHM_DIR / f"ember-kv-{gone.pid}-deadbeef"  # as a killed worker leaves it
    stale.write_bytes(b"kv")
    shared_kv_pool((4,), torch.float32).close()
    assert not stale.exists()


def test_descriptor_needs_a_shared_pool() -> None:
    with make_transport("shm") as transport:
        transport.register(torch.zeros(SHAPE, dtype=torch.bfloat16))  # may still send
        with pytest.raises(KVTransferError, match="shared_kv_pool"):
            transport.descriptor()


def test_peer_on_another_host_is_refused() -> None:
    shared = shared_kv_pool(SHAPE, torch.bfloat16)
    with make_transport("shm") as transport:
        transport.register(shared.tensor)
        elsewhere = {**transport.descriptor(), "host": "other-machine/boot"}
        with pytest.raises(KVTransferError, match="not this one"):
            transport.write(elsewhere, [(0, 0, 64)])
    shared.close()


def test_connect_maps_the_peer_or_names_it() -> None:
    shared, other = shared_kv_pool(SHAPE, torch.bfloat16), shared_kv_pool(SHAPE, torch.bfloat16)
    with make_transport("shm") as transport, make_transport("shm") as receiver:
        transport.register(shared.tensor)
        receiver.register(other.tensor)
        peer = receiver.descriptor()
        transport.connect(peer)
        other.tensor.fill_(1.0)  # mapped, not copied: later writes land in the live pool
        transport.write(peer, [(0, 0, 64)])
        assert not other.tensor.view(-1)[:32].any() and other.tensor.view(-1)[32:].all()
        missing = {**peer, "path": "/dev/shm/ember-kv-no-such-pool"}
        with pytest.raises(KVTransferError, match="cannot map peer.*no-such-pool"):
            transport.connect(missing)
    shared.close()
    other.close()
