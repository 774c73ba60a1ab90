"""`ember up`: a whole fleet on this machine: workers (disaggregated prefill + decode, or
colocated) and `ember router` in front, started together, stopped together on Ctrl-C.

Each worker is an `ember serve` process with its share of the cores, publishing KV events to
the router; disaggregated workers move KV over shared memory (same host) unless told
otherwise. The router is the one URL clients use.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ember.bench.serve.servers import ServerLaunch, ServerProcess, free_port
from ember.cpu_cores import available_cores, format_cpu_list, split_cores
from ember.server.how_to_call import HOW_TO_CALL


@dataclass(frozen=True)
class FleetPlan:
    model: str
    served_model_name: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    kv_transfer_backend: str = "shm"
    worker_args: tuple[str, ...] = ()  # engine options passed to every worker
    prefill_args: tuple[str, ...] = ()  # ... then to prefill workers (later options win)
    router_args: tuple[str, ...] = ()  # router options
    bind_cores: bool = False  # each worker on its own share of the cores
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ember-up-")))

    def validate(self) -> None:
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("use either --workers N (colocated) or --prefill/--decode")
        if (self.prefill > 0) != (self.decode > 0):
            raise ValueError("a disaggregated fleet needs at least one prefill and one decode "
                             "worker")
        if self.num_workers < 1:
            raise ValueError("the fleet needs at least one worker")
        if self.bind_cores:
            split_cores(self.num_workers)

    @property
    def num_workers(self) -> int:
        return self.prefill + self.decode + self.colocated

    def roles(self) -> list[str]:
        return ["prefill"] * self.prefill + ["decode"] * self.decode + \
            ["both"] * self.colocated


def _threads_each(plan: FleetPlan) -> int:
    return max(1, len(available_cores()) // plan.num_workers)


def worker_launch(plan: FleetPlan, index: int, role: str) -> ServerLaunch:
    argv = [sys.executable, "-m", "ember.cli", "serve", "--model", plan.model,
            "--served-model-name", plan.served_model_name, "--role", role,
            "--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}", *plan.worker_args]
    if role == "prefill":
        argv += plan.prefill_args
    if "--num-threads" not in plan.worker_args:
        argv += ["--num-threads", str(_threads_each(plan))]
    if role != "both":
        argv += ["--kv-transfer-backend", plan.kv_transfer_backend]
    if plan.bind_cores:
        argv += ["--cpu-cores", format_cpu_list(split_cores(plan.num_workers)[index])]
    return ServerLaunch(f"{role}{index}", tuple(argv), {"TOKENIZERS_PARALLELISM": "false"},
                        start_timeout_s=600)


def router_launch(plan: FleetPlan, worker_urls: list[str]) -> ServerLaunch:
    argv = [sys.executable, "-m", "ember.cli", "router", "--model", plan.model,
            *plan.router_args]
    for url in worker_urls:
        argv += ["--worker", url]
    return ServerLaunch("router", tuple(argv), start_timeout_s=120)


class Fleet:
    """The started processes; `stop()` takes them all down (router first)."""

    def __init__(self, plan: FleetPlan) -> None:
        plan.validate()
        self.plan = plan
        self.workers: list[ServerProcess] = []
        self.router: ServerProcess | None = None

    def start(self) -> str:
        """Start everything, wait until healthy; returns the router's URL."""
        try:
            for i, role in enumerate(self.plan.roles()):
                launch = worker_launch(self.plan, i, role)
                self.workers.append(ServerProcess(launch, self.plan.log_dir / f"{launch.name}.log"))
            for worker in self.workers:
                worker.wait_ready()
            self.router = _RouterProcess(router_launch(self.plan, [w.url for w in self.workers]),
                                         self.plan)
            self.router.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.router.url

    def stop(self) -> None:
        for proc in [self.router, *self.workers]:
            if proc is not None:
                proc.stop()


class _RouterProcess(ServerProcess):
    """The router on the plan's host and port (the one address clients use)."""

    def __init__(self, launch: ServerLaunch, plan: FleetPlan) -> None:
        self._fixed = (plan.host, plan.port or free_port())
        super().__init__(launch, plan.log_dir / "router.log")

    def _argv(self, launch: ServerLaunch) -> list[str]:
        host, port = self._fixed
        self.port, self.url = port, f"http://{host}:{port}"
        return [*launch.argv, "--host", host, "--port", str(port)]


def run_up(plan: FleetPlan) -> int:
    fleet = Fleet(plan)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    kind = (f"{plan.prefill} prefill + {plan.decode} decode workers" if plan.prefill
            else f"{plan.colocated} colocated worker(s)")
    print(f"ember up: starting {kind} and a router (logs in {plan.log_dir})", flush=True)
    url = fleet.start()
    try:
        print(HOW_TO_CALL.format(name=plan.served_model_name, base=f"{url}/v1", root=url,
                                 key="none", auth=""), flush=True)
        while not stop.wait(1.0):
            dead = [p.launch.name for p in [fleet.router, *fleet.workers]
                    if p is not None and p.proc.poll() is not None]
            if dead:
                print(f"ember up: {', '.join(dead)} exited; stopping the fleet (logs in "
                      f"{plan.log_dir})", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        fleet.stop()
