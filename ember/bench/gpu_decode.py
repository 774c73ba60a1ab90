"""`ember bench gpu`: decode step time of a Llama-3-8B-shaped bf16 model against its floor,
and prefill throughput of a long prompt (GPU only).

The floor of one decode step is the bytes it must read from device memory (every weight once,
plus the KV cache of every sequence in the batch) over the copy bandwidth measured on the same
card in the same run. The model has random weights, made on the GPU on first use and cached.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.bench.efficiency import EfficiencyConfig, decode_batch, instrument
from ember.bench.gpu_timing import cuda_median_ms
from ember.bench.models import count_parameters

# Llama-3-8B's shapes (meta-llama/Meta-Llama-3-8B config.json), random weights.
LLAMA3_8B_SHAPE: dict[str, Any] = dict(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, num_layers=32,
    num_heads=32, num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16",
    tokenizer_vocab_size=32000,  # the rest of the vocabulary is never produced by a prompt
)


@dataclass(frozen=True)
class GpuBenchConfig:
    model_dir: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 32)
    prompt_len: int = 512  # context of each sequence before the timed decode steps
    num_steps: int = 50
    prefill_len: int = 4096
    prefill_repeats: int = 3
    kv_cache_gib: float = 16.0
    enforce_eager: bool = False


def build_llama3_8b_shaped(root: Path | None = None) -> Path:
    from ember.model.demo import cached_model_dir

    return cached_model_dir("bench-llama3-8b-shape-bf16-v1", root, init_device="cuda",
                            shard_size="5GB", **LLAMA3_8B_SHAPE)


def decode_floor_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int,
                       context: float) -> float:
    """Device-memory bytes one decode step must read: every weight once, and each of `batch`
    sequences' KV cache over its `context` tokens."""
    return weight_bytes + batch * context * kv_bytes_per_token


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 20) -> float:
    """Device-memory bytes per second of a large device-to-device copy (read + write)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = cuda_median_ms(lambda: dst.copy_(src), repeats) / 1e3
    return 2 * nbytes / seconds


def graph_replay_ms(core: Any, batch: int, repeats: int = 20) -> float:
    """GPU time of the captured decode forward for `batch` alone (no host work), median; nan
    without CUDA graphs. The step time less this is the engine's host time per step."""
    graphs = core.runner.decode_graphs
    if graphs is None:
        return float("nan")
    graph, _ = graphs._graphs[graphs.padded_size(batch)]
    return cuda_median_ms(graph.replay, repeats)


def _prefill_tokens_per_s(core: Any, cfg: GpuBenchConfig, vocab_size: int) -> dict[str, Any]:
    """Seconds from adding a fresh `prefill_len`-token prompt to its first token (max_tokens=1)."""
    from ember.engine.messages import EngineCoreRequest
    from ember.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    seconds = []
    for i in range(cfg.prefill_repeats + 1):  # the first is a warm-up
        prompt = torch.randint(16, vocab_size, (cfg.prefill_len,), generator=gen).tolist()
        t0 = time.perf_counter()
        core.add_request(EngineCoreRequest(f"prefill-{i}", prompt, params, time.monotonic()))
        while core.has_unfinished:
            core.step()
        seconds.append(time.perf_counter() - t0)
    best = min(seconds[1:])
    return {"prompt_tokens": cfg.prefill_len, "seconds": seconds[1:],
            "tokens_per_s": cfg.prefill_len / best}


def run_gpu_bench(cfg: GpuBenchConfig) -> dict[str, Any]:
    from ember.config import EngineConfig
    from ember.engine.engine_core import EngineCore

    model_dir = cfg.model_dir or build_llama3_8b_shaped()
    gc.collect()
    torch.cuda.empty_cache()
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()  # the copy's 8 GiB back before the engine sizes its KV cache
    t0 = time.perf_counter()
    core = EngineCore(EngineConfig.from_options(
        str(model_dir), dtype="bfloat16", device="cuda", enforce_eager=cfg.enforce_eager,
        kv_cache_memory=int(cfg.kv_cache_gib * 2**30), max_num_seqs=max(cfg.batch_sizes),
        max_num_batched_tokens=cfg.prefill_len, enable_prefix_caching=False))
    load_s = time.perf_counter() - t0
    hf_config = json.loads((model_dir / "config.json").read_text())
    weight_bytes = count_parameters(hf_config)["total"] * 2
    info = core.model_info
    kv_per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 2
    timers, chunk_sizes = instrument(core)
    eff = EfficiencyConfig(prompt_len=cfg.prompt_len, num_steps=cfg.num_steps)
    rows = []
    for batch in cfg.batch_sizes:
        row = decode_batch(core, batch, eff, info.vocab_size, timers, chunk_sizes)
        context = cfg.prompt_len + eff.num_warmup_steps + cfg.num_steps / 2  # mean over steps
        row["floor_ms"] = decode_floor_bytes(weight_bytes, kv_per_token, batch, context
                                             ) / bandwidth * 1e3
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
        # the replay reads the metadata the last timed step left in the graph's buffers
        row["graph_replay_ms"] = graph_replay_ms(core, batch)
        rows.append(row)
    prefill = _prefill_tokens_per_s(core, cfg, info.vocab_size)
    return {"device": torch.cuda.get_device_name(), "model_dir": str(model_dir),
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
            "copy_bandwidth_bytes_s": bandwidth, "engine_load_s": load_s,
            "enforce_eager": cfg.enforce_eager, "prompt_len": cfg.prompt_len,
            "decode": rows, "prefill": prefill}


def gpu_bench_markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['device']}: copy bandwidth {report['copy_bandwidth_bytes_s'] / 1e12:.2f} "
             f"TB/s (read + write); weights {report['weight_bytes'] / 1e9:.2f} GB; "
             f"CUDA graphs {'off' if report['enforce_eager'] else 'on'}", "",
             "| batch | step ms (median) | step ms (min) | floor ms | step / floor | "
             "graph replay ms | output tok/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['step_ms']:.2f} | {r['step_min_ms']:.2f} | "
              f"{r['floor_ms']:.2f} | {r['step_over_floor']:.2f} | {r['graph_replay_ms']:.2f} | "
              f"{r['output_tok_s']:.0f} |" for r in report["decode"]]
    p = report["prefill"]
    lines += ["", f"Prefill of a {p['prompt_tokens']}-token prompt: "
              f"{p['tokens_per_s']:.0f} tokens/s (best of {len(p['seconds'])})"]
    return "\n".join(lines) + "\n"


def cmd_gpu_bench(args: argparse.Namespace) -> int:
    report = run_gpu_bench(GpuBenchConfig(
        model_dir=args.model, batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len,
        num_steps=args.num_steps, prefill_len=args.prefill_len,
        kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(gpu_bench_markdown(report))
    return 0


def add_gpu_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="GPU decode step of a Llama-3-8B-shaped bf16 model vs its "
                       "memory-bandwidth floor, and prefill tokens/s of a long prompt.")
    p.add_argument("--model", type=Path, default=None,
                   help="bf16 model directory (default: a random Llama-3-8B-shaped model, "
                   "built on the GPU on first use in the ember cache dir).")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[1, 32], help="Comma-separated decode batch sizes.")
    p.add_argument("--prompt-len", type=int, default=512, help="Context before decoding.")
    p.add_argument("--num-steps", type=int, default=50, help="Timed decode steps per batch.")
    p.add_argument("--prefill-len", type=int, default=4096, help="Prompt of the prefill timing.")
    p.add_argument("--kv-cache-gib", type=float, default=16.0)
    p.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs.")
    p.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"))
    p.set_defaults(func=cmd_gpu_bench)
