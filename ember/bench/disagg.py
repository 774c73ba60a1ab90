"""`ember bench disagg`: disaggregated vs colocated serving at equal hardware, one run.

Setups (each worker gets one core's worth of threads): 1 prefill + 1 decode worker behind
`ember router`, against 2 colocated workers behind it. Workload: `num_streams` steady,
decode-heavy streams (short prompts, long answers, closed loop) plus, every `burst_every_s`,
a burst of long uncached prompts (the ones that stall colocated decodes). Reports ITL of the
steady streams, TTFT of both kinds, output throughput, and for the disaggregated fleet the KV
transfer rate its prefill worker achieved against the transport's raw rate measured in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.raw_probe import RawTransferProbe
from ember.bench.serve.client import RequestResult, build_payload, send_request
from ember.bench.serve.datasets import TextBuilder
from ember.bench.serve.report import latency_stats_ms
from ember.launch.up import Fleet, FleetPlan

SERVED_NAME = "bench"
SETUPS = ("disaggregated", "colocated")


@dataclass(frozen=True)
class DisaggBenchConfig:
    model_dir: str
    setups: tuple[str, ...] = SETUPS
    duration_s: float = 60.0
    num_streams: int = 6
    stream_prompt_tokens: int = 64
    stream_max_tokens: int = 256
    burst_every_s: float = 8.0
    burst_size: int = 2
    long_prompt_tokens: int = 3500
    long_max_tokens: int = 16
    kv_cache_bytes: int = 256 << 20  # per worker
    # a small step budget (the latency setting for colocated serving): prompts prefill in
    # many short chunks instead of stalling a step for seconds
    max_num_batched_tokens: int = 256
    # a prefill worker has no decodes to protect: it takes whole prompts per step
    prefill_max_num_batched_tokens: int = 2048
    min_remote_prefill_tokens: int | None = None  # the router's default when None
    max_model_len: int = 4096
    kv_transfer_backend: str = "shm"
    # each worker on its own core (the "one core each"); the router and the load
    # generator float over both
    bind_cores: bool = True
    raw_probe_every_s: float = 5.0  # raw-rate samples during each setup's run
    seed: int = 0


def _plan(cfg: DisaggBenchConfig, setup: str, log_dir: Path) -> FleetPlan:
    counts = {"prefill": 1, "decode": 1} if setup == "disaggregated" else {"colocated": 2}
    return FleetPlan(cfg.model_dir, SERVED_NAME, port=0, log_dir=log_dir,
                     kv_transfer_backend=cfg.kv_transfer_backend, bind_cores=cfg.bind_cores,
                     worker_args=(
                         "--num-threads", "1", "--kv-cache-memory", str(cfg.kv_cache_bytes),
                         "--max-model-len", str(cfg.max_model_len),
                         "--max-num-batched-tokens", str(cfg.max_num_batched_tokens)),
                     prefill_args=("--max-num-batched-tokens",
                                   str(cfg.prefill_max_num_batched_tokens)),
                     router_args=() if cfg.min_remote_prefill_tokens is None else (
                         "--min-remote-prefill-tokens", str(cfg.min_remote_prefill_tokens)),
                     **counts)


async def _steady(http: Any, url: str, prompt: str, phase: float, cfg: DisaggBenchConfig,
                  t0: float, deadline: float, out: list[RequestResult]) -> None:
    """One closed-loop stream. Its first answer is cut to `phase` (0 < phase <= 1) of the full
    length, so that streams are spread over their cycle from the start: streams started in
    step would all grow their contexts together, and the decode step with them, a sawtooth
    that steady traffic does not have."""
    max_tokens = max(1, round(cfg.stream_max_tokens * phase))
    while time.perf_counter() < deadline:
        payload = build_payload("completions", SERVED_NAME, max_tokens, ignore_eos=True,
                                prompt=prompt)
        out.append(await send_request(http, url, payload, {}, RequestResult(len(out)), t0))
        max_tokens = cfg.stream_max_tokens


async def _bursts(http: Any, url: str, builder: TextBuilder, cfg: DisaggBenchConfig,
                  rng: random.Random, t0: float, deadline: float,
                  out: list[RequestResult]) -> None:
    tasks = []
    while (now := time.perf_counter()) + cfg.burst_every_s < deadline:
        await asyncio.sleep(cfg.burst_every_s)
        for _ in range(cfg.burst_size):  # fresh text: nothing cached anywhere
            payload = build_payload("completions", SERVED_NAME, cfg.long_max_tokens,
                                    ignore_eos=True,
                                    prompt=builder.text(rng, cfg.long_prompt_tokens))
            result = RequestResult(len(out))
            out.append(result)
            tasks.append(asyncio.create_task(send_request(http, url, payload, {}, result, t0)))
        del now
    await asyncio.gather(*tasks)


async def _drive(cfg: DisaggBenchConfig, url: str, builder: TextBuilder) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(cfg.seed)
    streams: list[RequestResult] = []
    longs: list[RequestResult] = []
    endpoint = f"{url}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s
        prompts = [builder.text(rng, cfg.stream_prompt_tokens) for _ in range(cfg.num_streams)]
        await asyncio.gather(
            *(_steady(http, endpoint, p, (i + 1) / len(prompts), cfg, t0, deadline, streams)
              for i, p in enumerate(prompts)),
            _bursts(http, endpoint, builder, cfg, rng, t0, deadline, longs))
        elapsed = time.perf_counter() - t0
    return _summary(streams, longs, elapsed)


def _summary(streams: list[RequestResult], longs: list[RequestResult],
             elapsed: float) -> dict[str, Any]:
    ok = [r for r in streams + longs if r.success]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    return {"duration_s": elapsed, "num_requests": len(streams) + len(longs),
            "num_errors": len(streams) + len(longs) - len(ok),
            "errors": sorted({r.error for r in streams + longs if r.error})[:5],
            "output_tok_s": tokens / elapsed,
            "stream_itl_ms": latency_stats_ms([g for r in streams if r.success
                                               for g in r.itl_s]),
            "stream_ttft_ms": latency_stats_ms([r.ttft_s for r in streams
                                                if r.success and r.ttft_s is not None]),
            "long_ttft_ms": latency_stats_ms([r.ttft_s for r in longs
                                              if r.success and r.ttft_s is not None]),
            "num_long": len(longs)}


def _transfer_stats(fleet: Fleet) -> dict[str, float] | None:
    """The prefill worker's KV writes: GB/s over the writes alone (each decode peer's one-time
    set-up, mapping its pool, is counted apart) and how many pieces they took."""
    import httpx

    for worker in fleet.workers:
        text = httpx.get(f"{worker.url}/metrics", timeout=10).text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("ember:kv_transfer_")}
        sent = values.get("ember:kv_transfer_bytes_total", 0.0)
        if sent > 0:
            seconds = values.get("ember:kv_transfer_seconds_total", 0.0)
            cpu_seconds = values.get("ember:kv_transfer_cpu_seconds_total", 0.0)
            segments = values.get("ember:kv_transfer_segments_total", 0.0)
            return {"bytes": sent, "seconds": seconds, "segments": segments,
                    "mean_segment_kib": sent / segments / 1024 if segments else None,
                    "connect_seconds": values.get("ember:kv_transfer_connect_seconds_total"),
                    "wait_seconds": values.get("ember:kv_transfer_wait_seconds_total"),
                    "gb_s": sent / seconds / 1e9 if seconds else None,
                    # the same bytes over the writer's CPU time: what the copies achieve when
                    # not preempted (for shm, where the writer's thread does the copying)
                    "cpu_seconds": cpu_seconds,
                    "gb_s_on_cpu": sent / cpu_seconds / 1e9 if cpu_seconds else None}
    return None


def _run_setup(cfg: DisaggBenchConfig, setup: str, builder: TextBuilder,
               log_dir: Path) -> dict[str, Any]:
    fleet = Fleet(_plan(cfg, setup, log_dir / setup))
    url = fleet.start()
    try:
        # both setups carry the probe's few writes, so their latencies stay comparable
        with RawTransferProbe(cfg.kv_transfer_backend, every_s=cfg.raw_probe_every_s) as probe:
            summary = asyncio.run(_drive(cfg, url, builder))
        summary["raw_transfer_gb_s"] = probe.median_gb_s
        summary["raw_transfer_samples_gb_s"] = probe.samples_gb_s
        summary["kv_transfer"] = _transfer_stats(fleet) if setup == "disaggregated" else None
    finally:
        fleet.stop()
    return {"setup": setup, **summary}


def _quiet_raw_transfer_gb_s(cfg: DisaggBenchConfig) -> float | None:
    """The transport's raw rate (one large contiguous write between two processes) with no
    workload running, for reference."""
    from ember.bench.kv_transfer import KVTransferBenchConfig, run_kv_transfer_bench

    report = run_kv_transfer_bench(KVTransferBenchConfig(
        backends=(cfg.kv_transfer_backend,), layouts=("head-major",),
        patterns=("consecutive",), raw_mib=256, repeats=3))
    rows = report["backends"][0]["patterns"] if report.get("backends") else []
    return rows[0]["raw"]["gbps"] if rows else None


def run_disagg_bench(cfg: DisaggBenchConfig, log_dir: Path) -> dict[str, Any]:
    from ember.bench.throughput import machine_info
    from ember.model.tokenizer import load_tokenizer

    builder = TextBuilder(load_tokenizer(cfg.model_dir))
    runs = [_run_setup(cfg, setup, builder, log_dir) for setup in cfg.setups]
    report: dict[str, Any] = {"config": asdict(cfg), "runs": runs, "machine": machine_info()}
    report["quiet_raw_transfer_gb_s"] = _quiet_raw_transfer_gb_s(cfg)
    by = {r["setup"]: r for r in runs}
    if set(SETUPS) <= set(by):
        d, c = by["disaggregated"], by["colocated"]
        report["ratios"] = {
            "p90_itl": d["stream_itl_ms"]["p90"] / c["stream_itl_ms"]["p90"],
            "p99_itl": d["stream_itl_ms"]["p99"] / c["stream_itl_ms"]["p99"],
            "throughput": d["output_tok_s"] / c["output_tok_s"]}
        transfer = d.get("kv_transfer") or {}
        if transfer.get("gb_s") and d.get("raw_transfer_gb_s"):
            report["ratios"]["transfer_of_raw"] = transfer["gb_s"] / d["raw_transfer_gb_s"]
    return report


def disagg_markdown(report: dict[str, Any]) -> str:
    lines = ["| setup | stream ITL p50 / p90 / p99 (ms) | stream TTFT p90 | long TTFT p50 / p90 "
             "(ms) | output tok/s | errors |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        itl, st, lt = run["stream_itl_ms"], run["stream_ttft_ms"], run["long_ttft_ms"]
        lines.append(f"| {run['setup']} | {itl['p50']:.1f} / {itl['p90']:.1f} / "
                     f"{itl['p99']:.1f} | {st['p90']:.0f} | {lt['p50']:.0f} / {lt['p90']:.0f} "
                     f"| {run['output_tok_s']:.1f} | {run['num_errors']} |")
    run = next((r for r in report["runs"] if r.get("kv_transfer")), None)
    if run:
        transfer = run["kv_transfer"]
        lines += ["", f"KV transfer: {transfer['bytes'] / 1e6:.1f} MB in "
                  f"{transfer['seconds']:.3f} s of writes = {transfer['gb_s'] or 0:.2f} GB/s "
                  f"(raw, sampled during the run: {run.get('raw_transfer_gb_s') or 0:.2f} GB/s; "
                  f"on the quiet machine: {report.get('quiet_raw_transfer_gb_s') or 0:.2f}), "
                  f"{transfer['segments']:.0f} pieces of {transfer['mean_segment_kib'] or 0:.1f}"
                  f" KiB on average; peer set-up {transfer['connect_seconds'] or 0:.3f} s; "
                  f"over the writer's CPU time only: {transfer.get('gb_s_on_cpu') or 0:.2f} "
                  "GB/s"]
    ratios = report.get("ratios") or {}
    if ratios:
        lines.append("")
        lines.append("disaggregated / colocated: " + ", ".join(
            f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


def add_disagg_parser(sub: Any) -> None:
    db = sub.add_parser("disagg", help="1 prefill + 1 decode worker vs 2 colocated workers on "
                        "steady streams plus bursts of long prompts: ITL, TTFT, throughput, "
                        "KV transfer rate vs the transport's raw rate.")
    db.add_argument("--model", default=None, help="Model directory (default: 10m bench model).")
    db.add_argument("--duration-s", type=float, default=60.0)
    db.add_argument("--num-streams", type=int, default=6)
    db.add_argument("--long-prompt-tokens", type=int, default=3500)
    db.add_argument("--burst-every-s", type=float, default=8.0)
    db.add_argument("--burst-size", type=int, default=2)
    db.add_argument("--max-num-batched-tokens", type=int, default=256,
                    help="Step budget of colocated and decode workers.")
    db.add_argument("--prefill-max-num-batched-tokens", type=int, default=2048,
                    help="Step budget of prefill workers.")
    db.add_argument("--min-remote-prefill-tokens", type=int, default=None,
                    help="Router: shorter uncached prompts prefill on their decode worker "
                         "(default: the router's).")
    db.add_argument("--kv-transfer-backend", default="shm", choices=("shm", "mooncake"))
    db.add_argument("--bind-cores", action=argparse.BooleanOptionalAction, default=True,
                    help="Bind each worker to its own core (the router and load generator "
                         "are not bound).")
    db.add_argument("--out", type=Path, default=Path("benchmarks/disagg"))
    db.set_defaults(func=_cmd_disagg)


def _cmd_disagg(args: Any) -> int:
    import json

    from ember.bench.models import build_bench_model

    cfg = DisaggBenchConfig(
        model_dir=str(args.model or build_bench_model("10m")), duration_s=args.duration_s,
        num_streams=args.num_streams, long_prompt_tokens=args.long_prompt_tokens,
        burst_every_s=args.burst_every_s, burst_size=args.burst_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_max_num_batched_tokens=args.prefill_max_num_batched_tokens,
        min_remote_prefill_tokens=args.min_remote_prefill_tokens,
        kv_transfer_backend=args.kv_transfer_backend, bind_cores=args.bind_cores)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_disagg_bench(cfg, args.out / "logs")
    (args.out / "disagg.json").write_text(json.dumps(report, indent=2))
    print(disagg_markdown(report))
    return 0


