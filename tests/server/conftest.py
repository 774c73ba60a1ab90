"""Real `ember serve` processes on 127.0.0.1 (free ports), on a tiny fp32 model, torn down
with SIGTERM (and checked to exit 0)."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.bench.serve import servers
from ember.bench.serve.servers import free_port
from tests.factories import tiny_model_dir

# NOTE: one torch thread: on a 2-core CI box the server, the core and the test share the cores.
ENGINE_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory", str(4 << 20),
                "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
                "--num-threads", "1"]
MODEL_NAME = "tiny"
START_TIMEOUT_S = 120
_LOG_IDS = itertools.count()
__all__ = ["free_port"]  # re-exported for the router and KV-event tests


class ServerProcess(servers.ServerProcess):
    """`ember serve` on the tiny model with the test flags; logs beside the model."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        argv = (sys.executable, "-m", "ember.cli", "serve", "--model", str(model_dir),
                "--served-model-name", MODEL_NAME, *ENGINE_FLAGS, *flags)
        launch = servers.ServerLaunch("ember", argv, start_timeout_s=START_TIMEOUT_S)
        super().__init__(launch, model_dir.parent / f"server-{next(_LOG_IDS)}.log")

    def output(self) -> str:
        return self.log_tail(100_000)


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


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    """Poll `predicate` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def kv_usage(server: ServerProcess) -> tuple[float, float]:
    """(running sequences, KV usage) from the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("ember:num_requests_running", "ember:kv_cache_usage_perc"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["ember:num_requests_running"], values["ember:kv_cache_usage_perc"]
