"""The Mooncake Transfer Engine backend: one-sided batched writes into a peer's registered pool,
over TCP on one host or RDMA in a cluster, peers found by P2P handshake (no etcd).

Imports Mooncake lazily: ember runs without it until this backend is asked for.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar

import numpy as np
import torch

from ember.kv.transfer.base import KVTransferError, KVTransport
from ember.kv.transfer.layout import Segments, split_segments

PROTOCOLS = ("tcp", "rdma")
# NOTE: Mooncake's TCP transport queues at most 1024 transfers per peer by default
# (MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER) and fails the whole batch beyond that, so batches
# are cut well below it.
MAX_BATCH = 512
# Measured over loopback TCP: 256 MiB sent as 1 MiB transfers ran 1.2-2x faster than as one
# (Mooncake spreads a batch's transfers over its TCP lanes; one transfer uses one).
MAX_TRANSFER_BYTES = 1 << 20


class MooncakeTransport(KVTransport):
    """`hostname`: the address peers reach this process at (127.0.0.1 on one host, this node's
    IP in a cluster); `protocol`: "tcp" or "rdma"; `device_name`: RDMA devices, comma-separated
    ("" = all); `timeout_s`: per write (also passed on as MC_TRANSFER_TIMEOUT)."""

    name: ClassVar[str] = "mooncake"
    peer_fields: ClassVar[tuple[str, ...]] = ("session", "base")

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device_name: str = "", timeout_s: float = 30.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        # NOTE: read by Mooncake on import or engine start: one value per process. Its INFO
        # lines (every connection and segment opened) stay out of workers' logs unless
        # MC_LOG_LEVEL says otherwise. Its synchronous batch waits time out after ~5 s anyway.
        os.environ["MC_TRANSFER_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
        self._engine = _import_engine()()
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise KVTransferError(f"mooncake: initialize({hostname!r}, {protocol!r}) failed "
                                  f"with code {rc}")
        self.session = f"{hostname}:{self._engine.get_rpc_port()}"
        self._registered: int | None = None
        super().__init__(timeout_s)  # last: its worker threads start only for a working engine

    def peer_name(self, peer: dict[str, Any]) -> str:
        return str(peer.get("session"))

    def _register(self, pool: torch.Tensor) -> None:
        nbytes = pool.numel() * pool.element_size()
        rc = self._engine.register_memory(pool.data_ptr(), nbytes)
        if rc != 0:
            raise KVTransferError(f"mooncake: register_memory of {nbytes} bytes failed "
                                  f"with code {rc}")
        self._registered = pool.data_ptr()

    def _endpoint(self) -> dict[str, Any]:
        return {"session": self.session, "protocol": self.protocol,
                "base": self.pool.data_ptr()}

    def _write(self, peer: dict[str, Any], segments: Segments) -> None:
        session = peer["session"]
        segments = split_segments(segments, MAX_TRANSFER_BYTES)
        src = (segments[:, 0] + self.pool.data_ptr()).tolist()
        dst = (segments[:, 1] + int(peer["base"])).tolist()
        lengths = segments[:, 2].tolist()
        for start in range(0, len(lengths), MAX_BATCH):
            end = start + MAX_BATCH
            rc = self._engine.batch_transfer_sync_write(session, src[start:end], dst[start:end],
                                                        lengths[start:end])
            if rc != 0:
                raise KVTransferError(
                    f"mooncake: write of {int(np.sum(lengths))} bytes to peer {session} failed "
                    f"(code {rc}; Mooncake's log on stderr says why: peer gone, wrong address, "
                    f"timeout)")

    def _close(self) -> None:
        if self._registered is not None:
            self._engine.unregister_memory(self._registered)
            self._registered = None
        del self._engine


def _import_engine() -> type:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as err:
        raise KVTransferError(
            f"mooncake: cannot import the Mooncake Transfer Engine ({err}); install "
            f"mooncake-transfer-engine-non-cuda (CPU) and, even for TCP, "
            f"`apt-get install -y libibverbs1 librdmacm1 ibverbs-providers`") from err
    return TransferEngine
