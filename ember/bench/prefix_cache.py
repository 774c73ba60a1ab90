"""`ember bench prefix-cache`: one worker, the multi-turn `sessions` trace, four cache setups
(caching off; device only, with device KV too small for every session; + CPU tier; + disk
tier), each in a fresh `ember serve`. Reports prefix-cache hit ratio against the trace's ideal
(prompt tokens repeating a prefix some earlier request sent) and TTFT p50/p90.
"""

from __future__ import annotations

import asyncio
import bisect
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.datasets import Session, TextBuilder, sessions_dataset
from ember.bench.serve.loadgen import LoadGenerator, open_http
from ember.bench.serve.report import summarize
from ember.bench.serve.servers import ServerLaunch, running_server

SERVED_NAME = "bench"
MODES = ("off", "device", "cpu", "disk")
_MOD = (1 << 61) - 1
_BASE = 1_000_003


@dataclass(frozen=True)
class PrefixCacheBenchConfig:
    model_dir: str
    sessions: int = 24
    turns: int = 6
    system_prompt_len: int = 1500
    input_len: int = 96  # new tokens per turn
    output_len: int = 32
    rate: float = 2.0  # sessions per second
    max_concurrency: int = 8
    device_kv_bytes: int = 8 << 20  # too small for every session's history
    cpu_kv_bytes: int = 256 << 20
    disk_staging_cpu_bytes: int = 4 << 20  # the disk run's small CPU tier
    disk_kv_bytes: int = 1 << 30
    num_threads: int | None = None
    modes: tuple[str, ...] = MODES
    seed: int = 0


def _server_flags(cfg: PrefixCacheBenchConfig, mode: str, disk_dir: str) -> list[str]:
    flags = ["--served-model-name", SERVED_NAME, "--kv-cache-memory", str(cfg.device_kv_bytes)]
    if cfg.num_threads is not None:
        flags += ["--num-threads", str(cfg.num_threads)]
    if mode == "off":
        flags.append("--no-enable-prefix-caching")
    elif mode == "cpu":
        flags += ["--kv-cpu-bytes", str(cfg.cpu_kv_bytes)]
    elif mode == "disk":
        flags += ["--kv-cpu-bytes", str(cfg.disk_staging_cpu_bytes), "--kv-disk-dir", disk_dir,
                  "--kv-disk-bytes", str(cfg.disk_kv_bytes)]
    return flags


def _load_config(cfg: PrefixCacheBenchConfig, url: str) -> ServeBenchConfig:
    return ServeBenchConfig(
        url=url, dataset="sessions", model=SERVED_NAME, num_prompts=cfg.sessions * cfg.turns,
        sessions=cfg.sessions, turns=cfg.turns, system_prompt_len=cfg.system_prompt_len,
        input_len=cfg.input_len, output_len=cfg.output_len, range_ratio=0.25, rate=cfg.rate,
        max_concurrency=cfg.max_concurrency, ignore_eos=True, tokenizer=cfg.model_dir,
        seed=cfg.seed)


async def run_sessions(load: ServeBenchConfig, tokenizer: Any) -> tuple[list, list, float]:
    sessions = sessions_dataset(load, TextBuilder(tokenizer))
    async with open_http(load, len(sessions)) as http:
        gen = LoadGenerator(load, SERVED_NAME, http)
        duration_s = await gen.run(sessions)
    return sessions, gen.results, duration_s


def ideal_cached_tokens(prompts: list[list[int]]) -> list[int]:
    """Per prompt (in send order), the longest prefix that some earlier prompt also began
    with: what a perfect, unbounded prefix cache could reuse."""
    seen: set[tuple[int, int]] = set()  # (length, rolling hash) of every earlier prefix
    ideal = []
    for tokens in prompts:
        hashes, value = [], 0
        for token in tokens:
            value = (value * _BASE + token + 1) % _MOD
            hashes.append(value)
        # prefixes seen form a closed-downward set: find the longest by binary search
        num = bisect.bisect_left(range(len(tokens)), True,
                                 key=lambda k: (k + 1, hashes[k]) not in seen)
        ideal.append(num)
        seen.update((k + 1, h) for k, h in enumerate(hashes))
    return ideal


def prompt_tokens_sent(tokenizer: Any, sessions: list[Session], results: list) -> list[list[int]]:
    by_id = {s.session_id: s for s in sessions}
    prompts = []
    for r in results:
        session = by_id[r.session_id]
        past = Session(session.session_id, session.system_prompt, session.turns,
                       session.answers[: r.turn_idx])
        text = tokenizer.apply_chat_template(past.messages(r.turn_idx), tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def _run_mode(cfg: PrefixCacheBenchConfig, mode: str, tokenizer: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ember-prefix-cache-") as tmp:
        argv = (sys.executable, "-m", "ember.cli", "serve", "--model", cfg.model_dir,
                *_server_flags(cfg, mode, str(Path(tmp) / "kv-disk")))
        with running_server(ServerLaunch(f"ember-{mode}", argv), Path(tmp) / "server.log") \
                as server:
            load = _load_config(cfg, server.url)
            sessions, results, duration_s = asyncio.run(run_sessions(load, tokenizer))
    summary = summarize(results, duration_s, {})
    ok = sorted((r for r in results if r.success), key=lambda r: r.start_s)
    ideal = ideal_cached_tokens(prompt_tokens_sent(tokenizer, sessions, ok))
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    return {"mode": mode, "num_requests": len(results), "num_errors": len(results) - len(ok),
            "prompt_tokens": prompt, "cached_tokens": cached, "ideal_cached_tokens": sum(ideal),
            "hit_ratio": cached / prompt if prompt else 0.0,
            "ideal_hit_ratio": sum(ideal) / prompt if prompt else 0.0,
            "ttft_ms": summary["ttft_ms"], "e2e_ms": summary["e2e_ms"],
            "duration_s": duration_s}


def run_prefix_cache_bench(cfg: PrefixCacheBenchConfig) -> dict[str, Any]:
    from ember.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_dir)
    runs = [_run_mode(cfg, mode, tokenizer) for mode in cfg.modes]
    off = next((r for r in runs if r["mode"] == "off"), None)
    for run in runs:
        run["of_ideal"] = run["hit_ratio"] / run["ideal_hit_ratio"] if run[
            "ideal_hit_ratio"] else None
        if off is not None and off["ttft_ms"]["p90"]:
            run["p90_ttft_vs_off"] = run["ttft_ms"]["p90"] / off["ttft_ms"]["p90"]
    return {"config": asdict(cfg), "runs": runs}


def prefix_cache_markdown(report: dict[str, Any]) -> str:
    lines = ["| setup | hit ratio | ideal | of ideal | TTFT p50 (ms) | TTFT p90 (ms) | "
             "p90 vs off | errors |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        of_ideal = f"{run['of_ideal']:.1%}" if run["of_ideal"] is not None else "-"
        vs_off = f"{run.get('p90_ttft_vs_off', 0):.2f}" if "p90_ttft_vs_off" in run else "-"
        lines.append(f"| {run['mode']} | {run['hit_ratio']:.3f} | {run['ideal_hit_ratio']:.3f} "
                     f"| {of_ideal} | {run['ttft_ms']['p50']:.1f} | {run['ttft_ms']['p90']:.1f} "
                     f"| {vs_off} | {run['num_errors']} |")
    return "\n".join(lines)
