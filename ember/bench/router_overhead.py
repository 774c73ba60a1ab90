"""`ember bench router-overhead`: the latency `ember router` adds to each streamed token.

A stand-in worker (timestamp_worker.py) stamps every chunk with the monotonic clock when it
writes it; the client subtracts that from when the chunk reaches it. The same streams are
read straight from the worker and through the router, alternating rounds, at several numbers
of concurrent streams; the difference of the two latency distributions is the router's cost
per token (relay, event loop, loopback hop), and of the first chunk's the cost of routing.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.serve.servers import ServerLaunch, running_server


@dataclass(frozen=True)
class RouterOverheadConfig:
    concurrency: tuple[int, ...] = (1, 16, 64)
    num_rounds: int = 4  # per path and concurrency, alternating direct / router
    num_tokens: int = 100  # per stream
    interval_ms: float = 20.0  # between a stream's tokens (50 tokens/s)


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


async def _measure(cfg: RouterOverheadConfig, worker_url: str,
                   router_url: str) -> list[dict[str, Any]]:
    import aiohttp

    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for n in cfg.concurrency:
            samples = {"direct": _Samples([], []), "router": _Samples([], [])}
            for r in range(cfg.num_rounds + 1):  # round 0 warms both paths up
                for path, url in (("direct", worker_url), ("router", router_url)):
                    into = samples[path] if r else _Samples([], [])
                    await asyncio.gather(*(_stream(http, url, cfg, into) for _ in range(n)))
            rows.append(_row(n, samples))
    return rows


def _row(concurrency: int, samples: dict[str, _Samples]) -> dict[str, Any]:
    d_tok, r_tok = _stats(samples["direct"].token_ms), _stats(samples["router"].token_ms)
    d_first, r_first = _stats(samples["direct"].first_ms), _stats(samples["router"].first_ms)
    return {"concurrency": concurrency, "direct_token_ms": d_tok, "router_token_ms": r_tok,
            "added_token_ms": {k: r_tok[k] - d_tok[k] for k in ("p50", "p90", "p99", "mean")},
            "direct_first_ms": d_first, "router_first_ms": r_first,
            "added_first_ms": {k: r_first[k] - d_first[k] for k in ("p50", "p90", "mean")}}


def run_router_overhead(cfg: RouterOverheadConfig) -> dict[str, Any]:
    from ember.bench.throughput import machine_info

    worker = ServerLaunch("timestamp-worker", (
        sys.executable, "-m", "ember.bench.timestamp_worker",
        "--interval-ms", str(cfg.interval_ms)), start_timeout_s=60)
    with tempfile.TemporaryDirectory(prefix="ember-router-overhead-") as tmp, \
            running_server(worker, Path(tmp) / "worker.log") as w:
        router = ServerLaunch("router", (sys.executable, "-m", "ember.cli", "router",
                                         "--worker", w.url), start_timeout_s=60)
        with running_server(router, Path(tmp) / "router.log") as r:
            rows = asyncio.run(_measure(cfg, w.url, r.url))
    return {"config": asdict(cfg), "rows": rows, "machine": machine_info()}


def router_overhead_markdown(report: dict[str, Any]) -> str:
    lines = ["| streams | token latency direct p50 / p99 (ms) | via router p50 / p99 | "
             "**added per token p50 / p99** | first chunk added p50 |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        d, r, a = row["direct_token_ms"], row["router_token_ms"], row["added_token_ms"]
        lines.append(f"| {row['concurrency']} | {d['p50']:.3f} / {d['p99']:.3f} | "
                     f"{r['p50']:.3f} / {r['p99']:.3f} | **{a['p50']:.3f} / {a['p99']:.3f}** | "
                     f"{row['added_first_ms']['p50']:.2f} |")
    return "\n".join(lines)


def add_router_overhead_parser(sub: Any) -> None:
    ro = sub.add_parser("router-overhead", help="Latency `ember router` adds to each streamed "
                        "token: time-stamped streams read directly and through the router.")
    ro.add_argument("--concurrency", default="1,16,64",
                    help="Comma-separated numbers of concurrent streams.")
    ro.add_argument("--num-rounds", type=int, default=4, help="Rounds per path and level.")
    ro.add_argument("--num-tokens", type=int, default=100, help="Tokens per stream.")
    ro.add_argument("--interval-ms", type=float, default=20.0, help="Between a stream's tokens.")
    ro.add_argument("--out", type=Path, default=Path("benchmarks/router-overhead"),
                    help="Directory for the JSON report.")
    ro.set_defaults(func=_cmd_router_overhead)


def _cmd_router_overhead(args: Any) -> int:
    cfg = RouterOverheadConfig(tuple(int(x) for x in args.concurrency.split(",")),
                               args.num_rounds, args.num_tokens, args.interval_ms)
    report = run_router_overhead(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_overhead.json").write_text(json.dumps(report, indent=2))
    print(router_overhead_markdown(report))
    return 0
