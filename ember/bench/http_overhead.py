"""`ember bench http-overhead`: what the HTTP path adds to time to first token.

One `ember serve` process and one in-process AsyncEngineClient, same model and options, are
sent the same requests one at a time, alternating; the paired TTFT differences are the cost
of HTTP (FastAPI, validation, JSON, SSE, loopback and the client's parsing).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SERVED_NAME = "bench"


@dataclass(frozen=True)
class OverheadConfig:
    model_dir: str
    num_requests: int = 100
    num_warmup: int = 10
    prompt_words: int = 48
    max_tokens: int = 4
    num_threads: int | None = None
    kv_cache_memory: int = 512 << 20
    seed: int = 0


def _prompts(cfg: OverheadConfig) -> list[str]:
    rng = random.Random(cfg.seed)
    words = "the model token cache block prefill decode batch stream server engine".split()
    total = cfg.num_warmup + cfg.num_requests
    return [" ".join(rng.choice(words) for _ in range(cfg.prompt_words)) for _ in range(total)]


def _engine_options(cfg: OverheadConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"kv_cache_memory": cfg.kv_cache_memory}
    if cfg.num_threads is not None:
        options["num_threads"] = cfg.num_threads
    return options


async def _engine_ttft(client: Any, prompt: str, cfg: OverheadConfig) -> float:
    from ember.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    ttft = None
    async for out in client.generate(prompt, params):
        if ttft is None and out.outputs[0].delta_text:
            ttft = time.perf_counter() - start
    assert ttft is not None, "the engine produced no text"
    return ttft


async def _http_ttft(session: Any, url: str, prompt: str, cfg: OverheadConfig) -> float:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": cfg.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    ttft = None
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"server answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    ttft = time.perf_counter() - start
    assert ttft is not None, "the server streamed no text"
    return ttft


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"p50": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "mean": statistics.fmean(ms), "min": ms[0]}


async def _measure(cfg: OverheadConfig, url: str) -> dict[str, Any]:
    import aiohttp

    from ember.config import EngineConfig
    from ember.engine.async_client import AsyncEngineClient

    config = EngineConfig.from_options(cfg.model_dir, **_engine_options(cfg))
    engine, http = [], []
    async with AsyncEngineClient.start(config) as client, aiohttp.ClientSession() as session:
        for i, prompt in enumerate(_prompts(cfg)):
            # alternate which goes first so neither always follows the other's cache warmth
            order = (0, 1) if i % 2 == 0 else (1, 0)
            pair = [0.0, 0.0]
            for which in order:
                pair[which] = await (_engine_ttft(client, prompt, cfg) if which == 0
                                     else _http_ttft(session, url, prompt, cfg))
            if i >= cfg.num_warmup:
                engine.append(pair[0])
                http.append(pair[1])
    diffs = [h - e for h, e in zip(http, engine)]
    return {"config": asdict(cfg), "engine_ttft_ms": _stats_ms(engine),
            "http_ttft_ms": _stats_ms(http),
            "overhead_ms": {"p50": statistics.median(d * 1000 for d in diffs),
                            "mean": statistics.fmean(d * 1000 for d in diffs),
                            "p50_of_http_minus_p50_of_engine":
                                statistics.median(http) * 1000 - statistics.median(engine) * 1000}}


def run_http_overhead(cfg: OverheadConfig) -> dict[str, Any]:
    from ember.bench.serve.servers import ServerLaunch, running_server
    from ember.bench.throughput import machine_info

    argv = [sys.executable, "-m", "ember.cli", "serve", "--model", cfg.model_dir,
            "--served-model-name", SERVED_NAME, "--kv-cache-memory", str(cfg.kv_cache_memory)]
    if cfg.num_threads is not None:
        argv += ["--num-threads", str(cfg.num_threads)]
    with tempfile.TemporaryDirectory(prefix="ember-http-overhead-") as tmp, \
            running_server(ServerLaunch("ember", tuple(argv)), Path(tmp) / "server.log") as server:
        report = asyncio.run(_measure(cfg, server.url))
    report["machine"] = machine_info()
    return report


def overhead_markdown(report: dict[str, Any]) -> str:
    e, h, o = report["engine_ttft_ms"], report["http_ttft_ms"], report["overhead_ms"]
    return "\n".join([
        "| path | TTFT p50 (ms) | p90 | mean |", "|---|---|---|---|",
        f"| engine client, in process | {e['p50']:.2f} | {e['p90']:.2f} | {e['mean']:.2f} |",
        f"| HTTP (`ember serve`) | {h['p50']:.2f} | {h['p90']:.2f} | {h['mean']:.2f} |",
        f"| **HTTP overhead** (paired) | **{o['p50']:.2f}** | | {o['mean']:.2f} |",
    ])
