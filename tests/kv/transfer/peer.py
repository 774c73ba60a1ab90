"""A KV pool in another process, behind a transport, driven over a pipe. Children come from a
fork server that has imported this module (torch included) but started no engine: they start
clean and in milliseconds."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
from typing import Any

import numpy as np
import torch

from ember.kv.transfer import KVTransferError, make_transport
from ember.kv.transfer.shm import shared_kv_pool

SHAPE = (4, 2, 32, 16, 2, 32)  # [layers, K/V, blocks, block_size, kv_heads, head_dim]
DTYPE = torch.bfloat16
REPLY_TIMEOUT_S = 30.0


def random_pool(seed: int, pool: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool.copy_(torch.randn(pool.shape, generator=g).to(pool.dtype))
    return pool


def pool_bytes(pool: torch.Tensor) -> np.ndarray:
    return pool.view(-1).view(torch.uint8).numpy().copy()


def new_pool(backend: str) -> tuple[torch.Tensor, Any]:
    """(tensor, owner): shm pools must live in shared memory to be written into."""
    if backend == "shm":
        shared = shared_kv_pool(SHAPE, DTYPE)
        return shared.tensor, shared
    return torch.zeros(SHAPE, dtype=DTYPE), None


def _serve(conn: Any, backend: str, seed: int, options: dict[str, Any]) -> None:
    transport = make_transport(backend, **options)
    pool, owner = new_pool(backend)
    transport.register(random_pool(seed, pool))
    conn.send(transport.descriptor())
    while True:
        command, *args = conn.recv()
        if command == "bytes":
            conn.send(pool_bytes(pool))
        elif command == "write":
            try:
                transport.write(*args)
                conn.send(None)
            except KVTransferError as err:
                conn.send(str(err))
        elif command == "close":
            transport.close()
            transport.close()
            if owner is not None:
                owner.close()
            conn.send("closed")
            return


class Peer:
    """The child process and its descriptor; every wait is bounded."""

    def __init__(self, backend: str, seed: int = 1, **options: Any) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, backend, seed, options),
                                   daemon=True)
        self.process.start()
        self.descriptor: dict[str, Any] = self._reply()

    def pool_bytes(self) -> np.ndarray:
        return self._ask("bytes")

    def write(self, peer: dict[str, Any], segments: np.ndarray) -> str | None:
        """The child writes into `peer`; returns the error message, if any."""
        return self._ask("write", peer, segments)

    def close(self) -> None:
        if self.process.is_alive():
            self._ask("close")
        self.process.join(REPLY_TIMEOUT_S)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(REPLY_TIMEOUT_S)

    def _ask(self, *message: Any) -> Any:
        self._conn.send(message)
        return self._reply()

    def _reply(self) -> Any:
        ready = mp.connection.wait([self._conn, self.process.sentinel], REPLY_TIMEOUT_S)
        if self._conn not in ready:
            self.process.kill()
            raise RuntimeError(f"peer process {self.process.pid} died or hung")
        return self._conn.recv()
