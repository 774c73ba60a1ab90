"""Real `ember serve` processes on 127.0.0.1 (free ports), on a tiny fp32 model, torn down
with SIGTERM (and checked to exit 0)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.factories import tiny_model_dir

# NOTE: one torch thread: on a 2-core CI box the server, the core and the test share the cores.
ENGINE_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory", str(4 << 20),
                "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
                "--num-threads", "1"]
MODEL_NAME = "tiny"
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir),
               "--port", str(self.port), "--served-model-name", MODEL_NAME,
               *ENGINE_FLAGS, *flags]
        self.log_path = model_dir.parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {START_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(model_dir: Path, *flags: str) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, *flags)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"server exited with {code}:\n{server.output()}"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("server-models"))


@pytest.fixture(scope="session")
def server(model_dir) -> Iterator[ServerProcess]:
    with running_server(model_dir) as s:
        yield s


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                       timeout=60)


def kv_usage(server: ServerProcess) -> tuple[float, float]:
    """(running sequences, KV usage) from the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("ember:num_requests_running", "ember:kv_cache_usage_perc"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["ember:num_requests_running"], values["ember:kv_cache_usage_perc"]
