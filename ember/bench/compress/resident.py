"""Throughput cost of keeping weights compressed in memory (`keep_weights_compressed`): the
same model generating at batch 1, 32 and 128 from its original directory and from its
`ember compress` output with layers decoded per step, in one process, side by side; plus the
weight memory each holds."""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ember.compress.resident import make_resident
from ember.model.loader import find_weight_files, load_model


@dataclass(frozen=True)
class ResidentBenchConfig:
    original: Path
    compressed: Path | None = None
    batch_sizes: tuple[int, ...] = (1, 32, 128)
    input_len: int = 32
    output_len: int = 32
    repeats: int = 2
    engine_options: tuple[tuple[str, Any], ...] = ()


def weight_memory(cfg: ResidentBenchConfig) -> dict[str, int]:
    """Bytes of layer weights held decoded vs kept compressed (+ the one decoded layer)."""
    model, _ = load_model(cfg.compressed)
    total = sum(p.nbytes for p in model.parameters())  # the original's: loaded bit for bit
    resident = make_resident(model, find_weight_files(cfg.compressed))
    return {"model_bytes": total, "layer_bytes": resident.decoded_bytes,
            "layer_bytes_compressed": resident.compressed_bytes,
            "scratch_bytes": resident.scratch_bytes, "saved_bytes": resident.saved_bytes}


def triton_decode_speed(shape: tuple[int, int] = (14336, 4096), repeats: int = 20
                        ) -> dict[str, float]:
    """The Triton decoder alone on one weight-like matrix (Llama-3-8B's MLP shape): output
    GB/s and the device bytes it moves (compressed in, decoded out) per second."""
    import numpy as np

    from ember.bench.gpu_timing import cuda_median_ms
    from ember.compress import triton_decode as td
    from ember.compress.codec import encode_bf16

    values = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).ravel()
    encoded = td.to_device(encode_bf16(bits), "cuda")
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    td.decode_bf16_triton(encoded, out, check=True)
    if not torch.equal(out.cpu(), values.to(torch.bfloat16)):
        raise RuntimeError("the Triton decoder's output differs from the encoded values")
    seconds = cuda_median_ms(lambda: td.decode_bf16_triton(encoded, out, check=False),
                             repeats) / 1e3
    return {"decoded_bytes": out.nbytes, "compressed_bytes": encoded.nbytes, "seconds": seconds,
            "output_gb_s": out.nbytes / seconds / 1e9,
            "device_gb_s": (out.nbytes + encoded.nbytes) / seconds / 1e9}


def _tokens_per_s(llm, batch: int, cfg: ResidentBenchConfig) -> float:
    from ember import SamplingParams

    params = SamplingParams(max_tokens=cfg.output_len, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 10 for j in range(cfg.input_len)]}
               for i in range(batch)]
    llm.generate(prompts[:2], params)  # warm-up
    best = 0.0
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return best


def run_resident_bench(cfg: ResidentBenchConfig) -> dict[str, Any]:
    """tok/s at each batch size from the original directory and with weights kept compressed
    (the compressed directory is made in a temp dir when cfg.compressed is None)."""
    if cfg.compressed is not None:
        return _run(cfg)
    from ember.compress.compressor import compress_model_dir

    with tempfile.TemporaryDirectory(prefix="ember-resident-") as tmp:
        compressed = Path(tmp) / "compressed"
        compress_model_dir(cfg.original, compressed, progress=False)
        return _run(replace(cfg, compressed=compressed))


def _run(cfg: ResidentBenchConfig) -> dict[str, Any]:
    from ember import LLM

    options = dict(cfg.engine_options)
    rows = {b: {} for b in cfg.batch_sizes}
    for mode, path, extra in (("original", cfg.original, {}),
                              ("kept_compressed", cfg.compressed,
                               {"keep_weights_compressed": True})):
        llm = LLM(str(path), max_num_seqs=max(cfg.batch_sizes), **options, **extra)
        for batch in cfg.batch_sizes:
            rows[batch][mode] = _tokens_per_s(llm, batch, cfg)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    runs = [{"batch": b, "original_tok_s": r["original"],
             "kept_compressed_tok_s": r["kept_compressed"],
             "throughput_cost": 1 - r["kept_compressed"] / r["original"]}
            for b, r in rows.items()]
    report = {"device": dict(cfg.engine_options).get("device", "auto"),
              "model": str(cfg.original), "memory": weight_memory(cfg), "runs": runs}
    if torch.cuda.is_available() and report["device"] in ("auto", "cuda"):
        report["gpu"] = torch.cuda.get_device_name()
        report["triton_decode"] = triton_decode_speed()
    return report


def resident_markdown(report: dict[str, Any]) -> str:
    mem = report["memory"]
    lines = [f"Layer weights: {mem['layer_bytes'] / 2**20:.1f} MiB decoded vs "
             f"{mem['layer_bytes_compressed'] / 2**20:.1f} MiB kept compressed + "
             f"{mem['scratch_bytes'] / 2**20:.1f} MiB for one decoded layer "
             f"({mem['saved_bytes'] / mem['model_bytes']:.1%} of the model's "
             f"{mem['model_bytes'] / 2**20:.1f} MiB saved)", "",
             "| batch | original tok/s | kept compressed tok/s | throughput cost |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['original_tok_s']:.1f} | {r['kept_compressed_tok_s']:.1f} "
              f"| {r['throughput_cost']:.1%} |" for r in report["runs"]]
    if "triton_decode" in report:
        t = report["triton_decode"]
        lines += ["", f"Triton decoder alone ({report['gpu']}): {t['decoded_bytes'] / 2**20:.0f} "
                  f"MiB in {t['seconds'] * 1e3:.3f} ms = {t['output_gb_s']:.0f} GB/s decoded, "
                  f"{t['device_gb_s']:.0f} GB/s of device traffic"]
    return "\n".join(lines) + "\n"
