"""`ember bench efficiency`: one decode step of ember vs its forward vs its GEMMs alone.

Drives an in-process EngineCore; times are taken by wrapping the model's methods on the
instance (the engine code is not changed). Also peak RSS beside weights + KV cache bytes.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ember.bench.models import build_bench_model, count_parameters


@dataclass(frozen=True)
class EfficiencyConfig:
    model_size: str = "10m"
    batch_sizes: tuple[int, ...] = (1, 64)
    prompt_len: int = 128  # context each sequence has before the timed decode steps
    num_steps: int = 20  # timed decode steps per batch size
    num_warmup_steps: int = 3
    kv_cache_gib: float = 1.0
    dtype: str = "bfloat16"
    model_dir: Path | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)


class _Timer:
    """Wraps a bound method on its instance and records the seconds of each call."""

    def __init__(self, owner: Any, name: str) -> None:
        self.seconds: list[float] = []
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds.append(time.perf_counter() - t0)
            return out

        setattr(owner, name, timed)


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every linear layer, in forward order, lm_head last."""
    from ember.model.layers import Linear

    linears = [m for name, m in model.named_modules()
               if isinstance(m, Linear) and not name.endswith("lm_head")]
    return [*linears, *[m for name, m in model.named_modules() if name.endswith("lm_head")]]


def gemm_seconds(layers: list[torch.nn.Module], num_rows: int, dtype: torch.dtype,
                 repeats: int = 20) -> tuple[float, float]:
    """(median, min) time of one pass over exactly these layers' GEMMs at M=num_rows.

    Calls each layer itself, so its weights are used as the forward uses them (e.g. prepacked
    for oneDNN); same dtype, threads and order, so the same weights stream through the caches.
    """
    device = next(layers[0].parameters()).device
    inputs = {m.in_features: torch.randn(num_rows, m.in_features, device=device).to(dtype)
              for m in layers}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            sync()
            t0 = time.perf_counter()
            for m in layers:
                m(inputs[m.in_features])
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def decode_batch(core: Any, batch: int, cfg: EfficiencyConfig, vocab_size: int,
                  timers: dict[str, _Timer], chunk_sizes: list[list[int]]) -> dict[str, Any]:
    from ember.engine.messages import EngineCoreRequest
    from ember.engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    # NOTE: early finishers of the prefill decode while others prefill: leave them ample room.
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1024)
    request_ids = [f"eff-{batch}-{i}" for i in range(batch)]
    for request_id in request_ids:
        prompt = [rng.randrange(16, vocab_size) for _ in range(cfg.prompt_len)]
        core.add_request(EngineCoreRequest(request_id, prompt, params, time.monotonic()))
    # Prefill until one step is pure decode of the whole batch, then warm up.
    while True:
        core.step()
        if chunk_sizes and chunk_sizes[-1] == [1] * batch:
            break
    for _ in range(cfg.num_warmup_steps):
        core.step()
    for timer in timers.values():
        timer.seconds.clear()
    chunk_sizes.clear()
    step_s = []
    for _ in range(cfg.num_steps):
        t0 = time.perf_counter()
        core.step()
        step_s.append(time.perf_counter() - t0)
    if any(sizes != [1] * batch for sizes in chunk_sizes):
        raise RuntimeError(f"a timed step was not a pure decode of {batch} sequences")
    core.abort_requests(request_ids)
    while core.has_unfinished:
        core.step()

    def med(values: list[float]) -> float:  # nan where a CUDA graph replaced the forward
        return statistics.median(values) * 1e3 if values else float("nan")

    step_ms = med(step_s)
    forward_ms, logits_ms = med(timers["forward"].seconds), med(timers["logits"].seconds)
    execute_ms = med(timers["execute"].seconds)
    # Per-step outside-the-forward time; its median is robust to a noisy neighbour.
    outside = [s - f - lg for s, f, lg in zip(step_s, timers["forward"].seconds,
                                             timers["logits"].seconds)] or [float("nan")]
    return {"batch": batch, "step_ms": step_ms, "step_min_ms": min(step_s) * 1e3,
            "execute_ms": execute_ms, "forward_ms": forward_ms, "logits_ms": logits_ms,
            "overhead_ms": med(outside), "overhead_frac": med(outside) / step_ms,
            "output_tok_s": batch / (step_ms / 1e3)}


def instrument(core: Any) -> tuple[dict[str, _Timer], list[list[int]]]:
    """Time the core's forward, logits and execute calls, and record each step's chunk sizes
    (what `decode_batch` takes)."""
    runner, model = core.runner, core.runner.model
    timers = {"forward": _Timer(model, "forward"), "logits": _Timer(model, "compute_logits"),
              "execute": _Timer(runner, "execute")}
    chunk_sizes: list[list[int]] = []
    execute_inner = runner.execute

    def execute(sched: Any, *args: Any) -> Any:
        chunk_sizes.append([c.num_tokens for c in sched.chunks])
        return execute_inner(sched, *args)

    runner.execute = execute
    return timers, chunk_sizes


def run_efficiency(cfg: EfficiencyConfig) -> dict[str, Any]:
    from ember.config import EngineConfig
    from ember.engine.engine_core import EngineCore

    model_dir = cfg.model_dir or build_bench_model(cfg.model_size)
    config = EngineConfig.from_options(
        str(model_dir), dtype=cfg.dtype, kv_cache_memory=int(cfg.kv_cache_gib * 2**30),
        max_num_seqs=max(max(cfg.batch_sizes), 128), **cfg.engine_options)
    core = EngineCore(config)
    model = core.runner.model
    timers, chunk_sizes = instrument(core)
    layers = linear_layers(model)
    rows = []
    for batch in cfg.batch_sizes:
        row = decode_batch(core, batch, cfg, core.model_info.vocab_size, timers, chunk_sizes)
        gemm_med, gemm_min = gemm_seconds(layers, batch, model.dtype)
        row["gemm_ms"], row["gemm_min_ms"] = gemm_med * 1e3, gemm_min * 1e3
        row["step_over_gemm"] = row["step_ms"] / row["gemm_ms"]
        row["step_over_gemm_min"] = row["step_min_ms"] / row["gemm_min_ms"]
        row["forward_over_gemm"] = (row["forward_ms"] + row["logits_ms"]) / row["gemm_ms"]
        rows.append(row)

    # From the checkpoint's config: a packed weight is no longer a plain parameter.
    hf_config = json.loads((model_dir / "config.json").read_text())
    weight_bytes = count_parameters(hf_config)["total"] * torch.empty((), dtype=model.dtype
                                                                       ).element_size()
    kv_bytes = core.runtime.kv_cache_bytes
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": cfg.model_size if cfg.model_dir is None else model_dir.name,
        "model_dir": str(model_dir), "prompt_len": cfg.prompt_len, "num_steps": cfg.num_steps,
        "num_threads": torch.get_num_threads(), "num_linear_layers": len(layers),
        "rows": rows, "weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes,
        "peak_rss_bytes": peak_rss,
        "rss_over_weights_kv": peak_rss / (weight_bytes + kv_bytes),
    }


def efficiency_markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["| model | batch | step ms | forward+logits ms | GEMMs alone ms | step/GEMM | "
             "step/GEMM (min/min) | overhead ms (step − forward) | overhead % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rep in reports:
        for r in rep["rows"]:
            lines.append(
                f"| {rep['model']} | {r['batch']} | {r['step_ms']:.2f} | "
                f"{r['forward_ms'] + r['logits_ms']:.2f} | {r['gemm_ms']:.2f} | "
                f"{r['step_over_gemm']:.2f}× | {r['step_over_gemm_min']:.2f}× | "
                f"{r['overhead_ms']:.2f} | {100 * r['overhead_frac']:.0f}% |")
    lines += ["", "Medians over the timed steps; GEMMs alone: the model's linear layers at "
              "M=batch, bf16, same threads; min/min: fastest step over fastest GEMM pass."]
    lines += ["", "| model | weights MiB | KV cache MiB | peak RSS MiB | RSS / (weights + KV) |",
              "|---|---:|---:|---:|---:|"]
    for rep in reports:
        lines.append(f"| {rep['model']} | {rep['weight_bytes'] / 2**20:.0f} | "
                     f"{rep['kv_cache_bytes'] / 2**20:.0f} | {rep['peak_rss_bytes'] / 2**20:.0f} "
                     f"| {rep['rss_over_weights_kv']:.2f}× |")
    return "\n".join(lines) + "\n"
