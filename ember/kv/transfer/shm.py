"""Same-host KV transfer through POSIX shared memory: pools live in /dev/shm files
(`SharedKVPool`), a writer maps its peer's file once and memcpys segments straight into it.

Only for peers on this host; it cannot reach another machine and never signals the peer.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import uuid
import weakref
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil
import torch

from ember.kv.transfer.base import KVTransferError, KVTransport
from ember.kv.transfer.layout import Segments
from ember.kv.transfer.memcopy import copy_segments

SHM_DIR = Path("/dev/shm")
_PREFIX = "ember-kv-"
# NOTE: populate the page tables when mapping: first-touch faults on a tmpfs mapping cost
# ~15 us a page in this VM, which made a 7 MB write take 30 ms instead of 6.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_POOLS: dict[int, SharedKVPool] = {}  # by base address; a pool stays until close() or exit


class SharedKVPool:
    """A zeroed tensor backed by a /dev/shm file that same-host peers can map.

    `close()` (or exit) unlinks the file; the memory goes once every mapping of it is gone.
    Files of ember processes that died without closing are removed when the next pool is made.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype,
                 name: str | None = None) -> None:
        remove_stale_pools()
        self.path = SHM_DIR / (name or f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self._mmap = _create_mapping(self.path, self.nbytes)
        self._unlink = weakref.finalize(self, _unlink, self.path)
        # [*shape] over the mapping; zeros, like torch.zeros
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8).view(dtype).view(shape)
        _POOLS[self.tensor.data_ptr()] = self

    def close(self) -> None:
        """Unlink the file (idempotent); this process's tensor stays usable."""
        _POOLS.pop(self.tensor.data_ptr(), None)
        self._unlink()

    @staticmethod
    def owning(tensor: torch.Tensor) -> SharedKVPool | None:
        """The pool whose mapping holds all of `tensor`'s bytes, if any."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for base, pool in list(_POOLS.items()):
            if base <= start and end <= base + pool.nbytes:
                return pool
        return None


def shared_kv_pool(shape: tuple[int, ...], dtype: torch.dtype,
                   name: str | None = None) -> SharedKVPool:
    """Allocate a KV pool in shared memory (its `.tensor` replaces allocate_kv_pool's)."""
    return SharedKVPool(shape, dtype, name)


class ShmTransport(KVTransport):
    """Writes into a same-host peer's SharedKVPool by memcpy; the local pool needs to be a
    SharedKVPool's tensor only for peers to write into it (any pool can be a source)."""

    name: ClassVar[str] = "shm"
    peer_fields: ClassVar[tuple[str, ...]] = ("path", "host", "pid", "pid_started")
    inline_writes: ClassVar[bool] = True  # a memcpy into a mapping cannot hang

    def __init__(self, timeout_s: float = 30.0) -> None:
        super().__init__(timeout_s)
        self._shared: SharedKVPool | None = None
        self._peers: dict[str, _MappedPeer] = {}  # by _peer_key

    def peer_name(self, peer: dict[str, Any]) -> str:
        return f"pid {peer.get('pid')} ({peer.get('path')})"

    def _register(self, pool: torch.Tensor) -> None:
        if pool.device.type != "cpu":
            raise KVTransferError("shm: the KV pool must be in host memory")
        self._shared = SharedKVPool.owning(pool)

    def _endpoint(self) -> dict[str, Any]:
        if self._shared is None:
            raise KVTransferError("shm: peers cannot write into this pool: allocate it with "
                                  "shared_kv_pool() to receive KV over shared memory")
        offset = self.pool.data_ptr() - self._shared.tensor.data_ptr()
        return {"path": str(self._shared.path), "offset": offset, "host": host_id(),
                "pid": os.getpid(), "pid_started": _started(os.getpid())}

    def _write(self, peer: dict[str, Any], segments: Segments) -> None:
        target = self._target(peer)
        copy_segments(target.view.ctypes.data + int(peer.get("offset", 0)),
                      self.pool.data_ptr(), segments)

    def _connect(self, peer: dict[str, Any]) -> None:
        self._target(peer)

    def _target(self, peer: dict[str, Any]) -> _MappedPeer:
        key = _peer_key(peer)
        if key not in self._peers:
            self._peers[key] = self._map(peer)
        if self._peers[key].has_exited():
            self._unmap(key)
            raise KVTransferError(f"shm: peer {self.peer_name(peer)} is not running")
        return self._peers[key]

    def _map(self, peer: dict[str, Any]) -> _MappedPeer:
        if peer["host"] != host_id():
            raise KVTransferError(f"shm: peer {self.peer_name(peer)} is on host "
                                  f"{peer['host']!r}, not this one; use mooncake across hosts")
        pid = int(peer["pid"])
        if _started(pid) != peer["pid_started"]:
            raise KVTransferError(f"shm: peer {self.peer_name(peer)} is not running")
        try:
            with open(peer["path"], "r+b") as f:
                mapping = mmap.mmap(f.fileno(), 0, flags=_MAP_FLAGS)
        except (OSError, ValueError) as err:
            raise KVTransferError(f"shm: cannot map peer {self.peer_name(peer)}'s pool: "
                                  f"{err}") from err
        if len(mapping) < int(peer["nbytes"]) + int(peer.get("offset", 0)):
            mapping.close()
            raise KVTransferError(f"shm: peer {self.peer_name(peer)}'s pool is smaller than "
                                  f"its descriptor says")
        return _MappedPeer(mapping, np.frombuffer(mapping, dtype=np.uint8), pid,
                           peer["pid_started"], _pidfd(pid))

    def _unmap(self, key: str) -> None:
        entry = self._peers.pop(key, None)
        if entry is not None:
            entry.close()

    def _close(self) -> None:
        for key in list(self._peers):
            self._unmap(key)


class _MappedPeer:
    """A peer's pool mapped here, and a handle on its process to notice when it is gone."""

    def __init__(self, mapping: mmap.mmap, view: np.ndarray, pid: int, started: float,
                 pidfd: int | None) -> None:
        self.mapping, self.view = mapping, view
        self._pid, self._started, self._pidfd = pid, started, pidfd

    def has_exited(self) -> bool:
        if self._pidfd is None:  # no pidfd here: ~100 us through /proc instead of ~2 us
            return _started(self._pid) != self._started
        return bool(select.select([self._pidfd], [], [], 0)[0])  # readable once it exits

    def close(self) -> None:
        del self.view
        self.mapping.close()
        if self._pidfd is not None:
            os.close(self._pidfd)


def _peer_key(peer: dict[str, Any]) -> str:
    """A mapping is reused only for the same file of the same process: a restarted peer
    reusing a pool name gets its new file mapped, not the old one."""
    return f"{peer['host']}|{peer['path']}|{peer['pid']}|{peer['pid_started']}"


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3, or not Linux
        return None


@cache
def host_id() -> str:
    """This host (and boot): peers with another id cannot share /dev/shm with us."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def remove_stale_pools() -> None:
    """Unlink /dev/shm pool files whose creating process is gone (killed before close())."""
    for path in SHM_DIR.glob(f"{_PREFIX}*"):
        pid = path.name.removeprefix(_PREFIX).split("-")[0]
        if pid.isdigit() and _started(int(pid)) is None:
            _unlink(path)


def _started(pid: int) -> float | None:
    """The process's start time (tells a live peer from a reused pid), None if gone."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _create_mapping(path: Path, nbytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # NOTE: reserve the pages now: a sparse file on a full /dev/shm would SIGBUS on the
        # first write instead of failing here.
        os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes, flags=_MAP_FLAGS)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
