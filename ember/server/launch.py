"""`ember serve`: runs the HTTP front end (uvicorn, uvloop where available) with the engine core
in its own process; SIGTERM drains (no new requests, in-flight streams finish) and exits 0."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import uvicorn

from ember.config import EngineConfig, ServerConfig
from ember.server.how_to_call import HOW_TO_CALL
from ember.server.metrics import ServerMetrics
from ember.server.state import ServerState

logger = logging.getLogger(__name__)


def check_model_dir(model: str) -> None:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {model!r} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{model} is not a Hugging Face model directory: no config.json")


def run_server(engine_config: EngineConfig, server_config: ServerConfig,
               model_name: str) -> int:
    from ember.server.app import build_app

    server_config.validate()
    check_model_dir(engine_config.model.model)
    state = ServerState(server_config, model_name, ServerMetrics(model_name))
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_ready(_: ServerState) -> None:
        host = server_config.host
        root = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{bound_port()}"
        key = server_config.api_key or "none"
        auth = f" -H 'Authorization: Bearer {key}'" if server_config.api_key else ""
        print(HOW_TO_CALL.format(name=model_name, base=f"{root}/v1", root=root, key=key,
                                 auth=auth), flush=True)

    def on_failed(_: str) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    def bound_port() -> int:
        assert server is not None
        for s in server.servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return server_config.port

    app = build_app(state, engine_config, on_ready=on_ready, on_failed=on_failed)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            loop="auto", http="auto", access_log=False, log_level="info",
                            timeout_graceful_shutdown=int(server_config.shutdown_grace_s) or None)
    server = _DrainingServer(config, state)
    server.run()
    return exit_code


class _DrainingServer(uvicorn.Server):
    """Marks the worker as draining (503, /health down) on SIGTERM/SIGINT, then lets uvicorn
    stop accepting and wait for in-flight responses up to the grace period."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.state.is_draining:
            logger.info("%s: draining; in-flight requests may finish", signal.Signals(sig).name)
        self.state.is_draining = True
        super().handle_exit(sig, frame)
        # NOTE: uvicorn re-raises captured signals after its graceful shutdown, which would
        # make a clean drain exit with -15; a drained worker exits 0.
        self._captured_signals.clear()
