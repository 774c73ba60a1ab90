"""Mooncake backend specifics: a stalled peer times out (no hang), options are validated."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from ember.kv.transfer import BlockLayout, KVTransferError, make_transport
from tests.kv.transfer.peer import SHAPE, Peer, new_pool

LAYOUT = BlockLayout.from_shape(SHAPE, element_size=2)


def test_stalled_peer_times_out_with_the_peer_named() -> None:
    peer = Peer("mooncake")
    transport = make_transport("mooncake", timeout_s=2.0)
    pool, _ = new_pool("mooncake")
    transport.register(pool)
    try:
        transport.write(peer.descriptor, LAYOUT.segments([0], [1]))  # connected and working
        os.kill(peer.process.pid, signal.SIGSTOP)
        start = time.monotonic()
        # NOTE: loopback socket buffers can swallow a few small writes to a stopped peer
        # (seen under a busy full suite); keep writing until one has to wait on the peer.
        with pytest.raises(KVTransferError, match=peer.descriptor["session"]):
            for _ in range(256):
                transport.write(peer.descriptor, [(0, 0, LAYOUT.pool_bytes)])
        assert time.monotonic() - start < 6.0
    finally:
        os.kill(peer.process.pid, signal.SIGCONT)
        transport.close()
        peer.kill()


def test_descriptor_names_session_protocol_and_address() -> None:
    with make_transport("mooncake", protocol="tcp") as transport:
        pool, _ = new_pool("mooncake")
        transport.register(pool)
        descriptor = transport.descriptor()
        assert descriptor["protocol"] == "tcp"
        assert descriptor["session"].startswith("127.0.0.1:")
        assert descriptor["base"] == pool.data_ptr()
        with pytest.raises(KVTransferError, match="already registered"):
            transport.register(pool)


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        make_transport("mooncake", protocol="carrier-pigeon")


def test_missing_mooncake_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # as if not installed
    with pytest.raises(KVTransferError, match="mooncake-transfer-engine-non-cuda.*libibverbs1"):
        make_transport("mooncake")
