"""`ember bench gemm`: ember's CPU GEMM for bf16 weights against the GEMMs the other engines
run, on a bench model's linear shapes, interleaved call by call (a noisy machine slows all of
them alike): ember's panel GEMM (AVX2) or oneDNN bf16 (where oneDNN has it), oneDNN's packed
fp32 (ember's and vLLM's `--dtype float32`), and PyTorch's bf16 `F.linear`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ember.bench.models import MODEL_SIZES, build_bench_model


@dataclass(frozen=True)
class GemmConfig:
    model_size: str = "250m"
    rows: tuple[int, ...] = (1, 16, 64, 512)
    repeats: int = 9


def linear_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A Llama-shaped config's linears as name -> (out_features, in_features)."""
    hidden, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    kv_heads = hf_config.get("num_key_value_heads", heads)
    return {"qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter), "lm_head": (hf_config["vocab_size"], hidden)}


def _implementations(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], Any]]:
    """name -> f(x bf16 [rows, in]) for one bf16 weight, each with its weights prepared once."""
    from ember.model.layers import Linear

    ember_linear = Linear(weight.shape[1], weight.shape[0], False, torch.bfloat16, "cpu")
    ember_linear.weight.data.copy_(weight)
    ember_linear.prepack_cpu()
    fp32 = torch.ops.mkldnn._reorder_linear_weight(weight.float(), 64)
    return {
        "ember bf16": ember_linear,
        "oneDNN fp32": lambda x: torch.ops.mkldnn._linear_pointwise(x.float(), fp32, None,
                                                                    "none", [], ""),
        "torch bf16": lambda x: F.linear(x, weight),
    }


def time_shape(weight: torch.Tensor, rows: int, repeats: int) -> dict[str, float]:
    """Median ms of each implementation at `rows` rows, calls interleaved."""
    impls = _implementations(weight)
    x = torch.randn(rows, weight.shape[1]).bfloat16()
    times: dict[str, list[float]] = {name: [] for name in impls}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn(x)
                if i:  # the first round warms caches and oneDNN's primitives
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def run_gemm(cfg: GemmConfig) -> dict[str, Any]:
    hf_config = json.loads((build_bench_model(cfg.model_size) / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    results = []
    for layer, (out_features, in_features) in linear_shapes(hf_config).items():
        weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).bfloat16()
        for rows in cfg.rows:
            ms = time_shape(weight, rows, cfg.repeats)
            results.append({"layer": layer, "out_features": out_features,
                            "in_features": in_features, "rows": rows, "ms": ms,
                            "gflops": {k: 2 * rows * out_features * in_features / v / 1e6
                                       for k, v in ms.items()}})
    return {"model": cfg.model_size, "num_threads": torch.get_num_threads(),
            "repeats": cfg.repeats, "results": results}


def gemm_markdown(report: dict[str, Any]) -> str:
    names = list(report["results"][0]["ms"])
    lines = [f"| layer | out × in | rows | {' | '.join(f'{n} ms' for n in names)} | "
             "ember bf16 / oneDNN fp32 | ember bf16 GFLOP/s |",
             "|---|---|---:|" + "---:|" * (len(names) + 2)]
    for r in report["results"]:
        ms = r["ms"]
        lines.append(f"| {r['layer']} | {r['out_features']}×{r['in_features']} | {r['rows']} | "
                     + " | ".join(f"{ms[n]:.3f}" for n in names)
                     + f" | {ms['oneDNN fp32'] / ms['ember bf16']:.2f}× | "
                     f"{r['gflops']['ember bf16']:.0f} |")
    lines += ["", f"Medians of {report['repeats']} interleaved calls, "
              f"{report['num_threads']} threads; the ratio is a speed-up (time of oneDNN fp32 "
              "over time of ember bf16)."]
    return "\n".join(lines) + "\n"


def cmd_gemm(args: argparse.Namespace) -> int:
    report = run_gemm(GemmConfig(model_size=args.model_size, rows=args.rows,
                                 repeats=args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm.json").write_text(json.dumps(report, indent=2))
    markdown = gemm_markdown(report)
    (args.out / "gemm.md").write_text(markdown)
    print(markdown)
    return 0


def add_gemm_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gemm", help="ember's bf16 CPU GEMM vs oneDNN fp32 and PyTorch bf16 on a "
                       "bench model's linear shapes, interleaved.")
    p.add_argument("--model-size", choices=list(MODEL_SIZES), default="250m",
                   help="Whose linear shapes (default: 250m).")
    p.add_argument("--rows", type=lambda v: tuple(int(x) for x in v.split(",")),
                   default=(1, 16, 64, 512), help="Rows of x (tokens in a step).")
    p.add_argument("--repeats", type=int, default=9, help="Timed calls per implementation.")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="Directory for gemm.json and gemm.md.")
    p.set_defaults(func=cmd_gemm)
