"""The KVTransport contract, passed by every backend between this process and a real peer
process: random blocks land bit-exactly, nothing else changes, failures are clear and bounded."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ember.kv.transfer import BlockLayout, KVTransferError, KVTransport, make_transport
from tests.kv.transfer.peer import SHAPE, Peer, new_pool, pool_bytes, random_pool

BACKENDS = ["shm", "mooncake"]
TIMEOUT_S = 10.0
LAYOUT = BlockLayout.from_shape(SHAPE, element_size=2)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def peer(backend: str) -> Iterator[Peer]:
    peer = Peer(backend, timeout_s=TIMEOUT_S)
    yield peer
    peer.close()


@pytest.fixture(scope="module")
def local(backend: str) -> Iterator[tuple[KVTransport, torch.Tensor]]:
    transport = make_transport(backend, timeout_s=TIMEOUT_S)
    pool, owner = new_pool(backend)
    transport.register(random_pool(7, pool))
    yield transport, pool
    transport.close()
    if owner is not None:
        owner.close()


def _expected(before: np.ndarray, source: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """What the destination's bytes must be: `before` with each segment copied, byte by byte."""
    after = before.copy()
    for src, dst, nbytes in segments.tolist():
        after[dst:dst + nbytes] = source[src:src + nbytes]
    return after


def _random_ids(seed: int, num: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return (rng.choice(LAYOUT.num_blocks, num, replace=False).tolist(),
            rng.choice(LAYOUT.num_blocks, num, replace=False).tolist())


def test_random_blocks_land_bit_exactly(local, peer: Peer) -> None:
    transport, pool = local
    src_ids, dst_ids = _random_ids(0, 11)
    segments = LAYOUT.segments(src_ids, dst_ids)
    before = peer.pool_bytes()
    transport.write(json.loads(json.dumps(peer.descriptor)), segments)  # as sent between hosts
    after = peer.pool_bytes()
    np.testing.assert_array_equal(after, _expected(before, pool_bytes(pool), segments))
    changed = np.flatnonzero(after != before)
    assert changed.size > 0  # random bf16 blocks differ somewhere


def test_layer_by_layer_async_writes(local, peer: Peer) -> None:
    transport, pool = local
    src_ids, dst_ids = _random_ids(1, 6)
    per_layer = [LAYOUT.segments(src_ids, dst_ids, layers=[i]) for i in range(LAYOUT.num_layers)]
    before = peer.pool_bytes()
    futures = [transport.write_async(peer.descriptor, segments) for segments in per_layer]
    for future in futures:
        assert future.result(TIMEOUT_S) is None
    expected = _expected(before, pool_bytes(pool), np.concatenate(per_layer))
    np.testing.assert_array_equal(peer.pool_bytes(), expected)


def test_a_queued_write_waits_for_its_ready_callback(local, peer: Peer) -> None:
    """`ready` (a CUDA event's synchronize in the sender) runs on the transport's thread and
    gates the copy; the copy's time is counted in busy_seconds, the wait for `ready` is not."""
    transport, pool = local
    segments = LAYOUT.segments([2, 3], [7, 8])
    gate, seen = threading.Event(), []
    before, busy = peer.pool_bytes(), transport.busy_seconds
    future = transport.write_async(peer.descriptor, segments,
                                   ready=lambda: (seen.append(threading.current_thread()),
                                                  gate.wait(TIMEOUT_S)))
    time.sleep(0.05)
    assert not future.done()  # held by its ready callback
    np.testing.assert_array_equal(peer.pool_bytes(), before)
    gate.set()
    assert future.result(TIMEOUT_S) is None
    assert seen and seen[0] is not threading.main_thread()
    np.testing.assert_array_equal(peer.pool_bytes(),
                                  _expected(before, pool_bytes(pool), segments))
    assert 0.05 > transport.busy_seconds - busy > 0
    assert transport.busy_cpu_seconds <= transport.busy_seconds + 1e-3


def test_a_blocking_write_lands_after_queued_ones(local, peer: Peer) -> None:
    transport, pool = local
    first, last = LAYOUT.segments([0], [5]), LAYOUT.segments([1], [5])  # one destination
    before = peer.pool_bytes()
    futures = [transport.write_async(peer.descriptor, first) for _ in range(3)]
    transport.write(peer.descriptor, last)
    for future in futures:
        assert future.done() and future.result() is None
    expected = _expected(before, pool_bytes(pool), np.concatenate([first, last]))
    np.testing.assert_array_equal(peer.pool_bytes(), expected)


def test_peer_writes_into_this_process(local, peer: Peer) -> None:
    transport, pool = local
    src_ids, dst_ids = _random_ids(2, 5)
    segments = LAYOUT.segments(src_ids, dst_ids)
    before = pool_bytes(pool)
    assert peer.write(transport.descriptor(), segments) is None
    np.testing.assert_array_equal(pool_bytes(pool), _expected(before, peer.pool_bytes(),
                                                              segments))


def test_connect_ahead_then_write(local, peer: Peer) -> None:
    transport, pool = local
    transport.connect(peer.descriptor)
    transport.connect(peer.descriptor)  # idempotent
    src_ids, dst_ids = _random_ids(3, 4)
    segments = LAYOUT.segments(src_ids, dst_ids)
    before = peer.pool_bytes()
    transport.write(peer.descriptor, segments)
    np.testing.assert_array_equal(peer.pool_bytes(), _expected(before, pool_bytes(pool),
                                                               segments))
    with pytest.raises(KVTransferError, match="version 99"):
        transport.connect({**peer.descriptor, "version": 99})


def test_dead_peer_is_a_clear_error_not_a_hang(local, backend: str) -> None:
    transport, _ = local
    segments = LAYOUT.segments([0, 1], [2, 3])
    for connected_first in (False, True):
        doomed = Peer(backend, timeout_s=TIMEOUT_S)
        if connected_first:  # dies after the transport connected to / mapped it
            transport.write(doomed.descriptor, segments)
        doomed.kill()
        start = time.monotonic()
        with pytest.raises(KVTransferError) as err:
            transport.write(doomed.descriptor, segments)
        assert time.monotonic() - start < TIMEOUT_S + 2
        assert transport.peer_name(doomed.descriptor) in str(err.value)


def test_wrong_descriptors_are_refused(local, peer: Peer, backend: str) -> None:
    transport, _ = local
    segments = LAYOUT.segments([0], [1])
    other = "mooncake" if backend == "shm" else "shm"
    with pytest.raises(KVTransferError, match=f"for backend '{other}'"):
        transport.write({**peer.descriptor, "backend": other}, segments)
    with pytest.raises(KVTransferError, match="version 99"):
        transport.write({**peer.descriptor, "version": 99}, segments)
    field = transport.peer_fields[0]
    with pytest.raises(KVTransferError, match=f"lacks field.*{field}"):
        transport.write({k: v for k, v in peer.descriptor.items() if k != field}, segments)
    with pytest.raises(KVTransferError, match="float8_e5m2.*--kv-cache-dtype"):
        transport.write({**peer.descriptor, "dtype": "float8_e5m2"}, segments)
    with pytest.raises(KVTransferError, match="write past peer"):
        transport.write(peer.descriptor, [(0, peer.descriptor["nbytes"] - 8, 16)])
    with pytest.raises(KVTransferError, match="read past the local pool"):
        transport.write(peer.descriptor, [(LAYOUT.pool_bytes - 8, 0, 16)])
    unreachable = ({"session": "127.0.0.1:1"} if backend == "mooncake"
                   else {"path": "/dev/shm/ember-kv-no-such-pool"})
    bad_peer = {**peer.descriptor, **unreachable}
    with pytest.raises(KVTransferError, match=re.escape(transport.peer_name(bad_peer))):
        transport.write(bad_peer, segments)


def test_close_is_idempotent_and_final(backend: str) -> None:
    transport = make_transport(backend, timeout_s=TIMEOUT_S)
    pool, owner = new_pool(backend)
    transport.register(pool)
    descriptor = transport.descriptor()
    transport.close()
    transport.close()
    with pytest.raises(KVTransferError, match="closed"):
        transport.write(descriptor, [(0, 0, 8)])
    if owner is not None:
        owner.close()


def test_unregistered_transport_and_unknown_backend() -> None:
    with make_transport("shm") as transport:
        with pytest.raises(KVTransferError, match="register"):
            transport.descriptor()
    with pytest.raises(ValueError, match="unknown KV transport 'nixl'"):
        make_transport("nixl")
