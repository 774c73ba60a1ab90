"""`ember bench router-overhead`: the latency `ember router` adds to each streamed token.

A stand-in worker (timestamp_worker.py) stamps every chunk with the monotonic clock when it
writes it; the client subtracts that from when the chunk reaches it. The same streams are
read straight from the worker and through the router, alternating rounds, at several numbers
of concurrent streams; the difference of the two latency distributions is the router's cost
per token (relay, event loop, loopback hop), and of the first chunk's the cost of routing.

With `router_cpus`, the router runs on those CPUs alone and the worker and the client on the
rest, as a front door with its own cores is deployed; otherwise all three share every CPU.
The router's CPU time per relayed chunk is measured either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.serve.servers import ServerLaunch, running_server
from ember.cpu_cores import available_cores, format_cpu_list, parse_cpu_list


@dataclass(frozen=True)
class RouterOverheadConfig:
    concurrency: tuple[int, ...] = (1, 16, 64)
    num_rounds: int = 4  # per path and concurrency, alternating direct / router
    num_tokens: int = 100  # per stream
    interval_ms: float = 20.0  # between a stream's tokens (50 tokens/s)
    router_cpus: tuple[int, ...] = ()  # the router's own CPUs; () = all share every CPU


@dataclass
class _Samples:
    token_ms: list[float]  # every chunk after the first: write -> read
    first_ms: list[float]  # request sent -> first chunk read


async def _stream(http: Any, url: str, cfg: RouterOverheadConfig, out: _Samples) -> None:
    body = {"model": "timestamps", "stream": True, "max_tokens": cfg.num_tokens,
            "messages": [{"role": "user", "content": "time me"}]}
    sent = time.monotonic_ns()
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        first = True
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            now = time.monotonic_ns()
            if first:
                out.first_ms.append((now - sent) / 1e6)
                first = False
            else:
                out.token_ms.append((now - json.loads(line[6:])["t_ns"]) / 1e6)


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values * 2 if len(values) == 1 else values, n=100,
                             method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values),
            "n": len(values)}


async def _measure(cfg: RouterOverheadConfig, worker_url: str, router_url: str,
                   router_cpu_seconds: Callable[[], float]) -> list[dict[str, Any]]:
    import aiohttp

    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for n in cfg.concurrency:
            samples = {"direct": _Samples([], []), "router": _Samples([], [])}
            router_cpu_s = 0.0
            for r in range(cfg.num_rounds + 1):  # round 0 warms both paths up
                for path, url in (("direct", worker_url), ("router", router_url)):
                    into = samples[path] if r else _Samples([], [])
                    cpu_before = router_cpu_seconds()
                    await asyncio.gather(*(_stream(http, url, cfg, into) for _ in range(n)))
                    if r and path == "router":
                        router_cpu_s += router_cpu_seconds() - cpu_before
            rows.append(_row(n, samples, router_cpu_s))
    return rows


def _row(concurrency: int, samples: dict[str, _Samples], router_cpu_s: float) -> dict[str, Any]:
    d_tok, r_tok = _stats(samples["direct"].token_ms), _stats(samples["router"].token_ms)
    d_first, r_first = _stats(samples["direct"].first_ms), _stats(samples["router"].first_ms)
    relayed = len(samples["router"].token_ms) + len(samples["router"].first_ms)
    return {"concurrency": concurrency, "direct_token_ms": d_tok, "router_token_ms": r_tok,
            "added_token_ms": {k: r_tok[k] - d_tok[k] for k in ("p50", "p90", "p99", "mean")},
            "direct_first_ms": d_first, "router_first_ms": r_first,
            "added_first_ms": {k: r_first[k] - d_first[k] for k in ("p50", "p90", "mean")},
            # request handling included: routing, the upstream request, the response headers
            "router_cpu_us_per_chunk": router_cpu_s / relayed * 1e6}


def _cpu_split(router_cpus: tuple[int, ...]) -> tuple[set[int] | None, set[int] | None]:
    """(the router's CPUs, everyone else's); (None, None) when none are reserved."""
    if not router_cpus:
        return None, None
    allowed = set(available_cores())
    mine, rest = set(router_cpus), allowed - set(router_cpus)
    if not mine <= allowed or not rest:
        raise ValueError(f"router_cpus {sorted(mine)} must be a proper subset of the CPUs this "
                         f"process may use ({sorted(allowed)})")
    if shutil.which("taskset") is None:
        raise RuntimeError("router_cpus needs `taskset` (util-linux)")
    return mine, rest


def _on_cpus(argv: tuple[str, ...], cpus: set[int] | None) -> tuple[str, ...]:
    return argv if cpus is None else ("taskset", "-c", format_cpu_list(tuple(sorted(cpus))), *argv)


@contextlib.contextmanager
def _this_process_on(cpus: set[int] | None) -> Iterator[None]:
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _on_cpu_seconds(pid: int) -> float:
    """Time the process's threads have run, to the nanosecond (psutil's CPU times count
    10 ms ticks, too coarse for a short run)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just exited
            total_ns += int((task / "schedstat").read_text().split()[0])
    return total_ns / 1e9


def run_router_overhead(cfg: RouterOverheadConfig) -> dict[str, Any]:
    from ember.bench.throughput import machine_info

    router_cpus, other_cpus = _cpu_split(cfg.router_cpus)
    worker = ServerLaunch("timestamp-worker", _on_cpus((
        sys.executable, "-m", "ember.bench.timestamp_worker",
        "--interval-ms", str(cfg.interval_ms)), other_cpus), start_timeout_s=60)
    with tempfile.TemporaryDirectory(prefix="ember-router-overhead-") as tmp, \
            running_server(worker, Path(tmp) / "worker.log") as w:
        router = ServerLaunch("router", _on_cpus((sys.executable, "-m", "ember.cli", "router",
                                                  "--worker", w.url), router_cpus),
                              start_timeout_s=60)
        with running_server(router, Path(tmp) / "router.log") as r, \
                _this_process_on(other_cpus):
            rows = asyncio.run(_measure(cfg, w.url, r.url,
                                        lambda: _on_cpu_seconds(r.proc.pid)))
    return {"config": asdict(cfg), "rows": rows, "machine": machine_info()}


def router_overhead_markdown(report: dict[str, Any]) -> str:
    lines = ["| streams | token latency direct p50 / p99 (ms) | via router p50 / p99 | "
             "**added per token p50 / p99** | first chunk added p50 | router CPU µs / chunk |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        d, r, a = row["direct_token_ms"], row["router_token_ms"], row["added_token_ms"]
        lines.append(f"| {row['concurrency']} | {d['p50']:.3f} / {d['p99']:.3f} | "
                     f"{r['p50']:.3f} / {r['p99']:.3f} | **{a['p50']:.3f} / {a['p99']:.3f}** | "
                     f"{row['added_first_ms']['p50']:.2f} | "
                     f"{row['router_cpu_us_per_chunk']:.1f} |")
    return "\n".join(lines)


def add_router_overhead_parser(sub: Any) -> None:
    ro = sub.add_parser("router-overhead", help="Latency `ember router` adds to each streamed "
                        "token: time-stamped streams read directly and through the router.")
    ro.add_argument("--concurrency", default="1,16,64",
                    help="Comma-separated numbers of concurrent streams.")
    ro.add_argument("--num-rounds", type=int, default=4, help="Rounds per path and level.")
    ro.add_argument("--num-tokens", type=int, default=100, help="Tokens per stream.")
    ro.add_argument("--interval-ms", type=float, default=20.0, help="Between a stream's tokens.")
    ro.add_argument("--router-cpus", default="",
                    help="CPUs for the router alone, e.g. 1 or 2-3 (the worker and the client "
                    "get the rest); default: all three share every CPU.")
    ro.add_argument("--out", type=Path, default=Path("benchmarks/router-overhead"),
                    help="Directory for the JSON report.")
    ro.set_defaults(func=_cmd_router_overhead)


def _cmd_router_overhead(args: Any) -> int:
    router_cpus = parse_cpu_list(args.router_cpus) if args.router_cpus else ()
    cfg = RouterOverheadConfig(tuple(int(x) for x in args.concurrency.split(",")),
                               args.num_rounds, args.num_tokens, args.interval_ms, router_cpus)
    report = run_router_overhead(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "router_overhead_pinned.json" if router_cpus else "router_overhead.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    print(router_overhead_markdown(report))
    return 0
