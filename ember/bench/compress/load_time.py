"""Load times from a cold page cache, uncompressed BF16 vs the `ember compress` output of the
same model: the raw read of the files, every tensor read into the same preallocated tensors
(WeightsFile.copy_into, which decodes compressed ones), and ember's load_model for decoders.

Writes only under the work directory it is given.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.bench.compress.page_cache import check_cache_drop, drop_from_page_cache, read_files
from ember.bench.compress.tensors import write_bf16_model_dir
from ember.compress.compressor import compress_model_dir
from ember.compress.format import WeightsFile
from ember.model.loader import find_weight_files, load_model, read_config

VARIANTS = ("bf16", "ember")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class LoadPair:
    name: str
    dirs: dict[str, Path]  # variant -> model directory
    is_decoder: bool  # ember's load_model can build it


def prepare_pair(name: str, src: Path, work_dir: Path) -> LoadPair:
    """BF16 copy of `src` and its `ember compress` output under work_dir/name."""
    bf16 = write_bf16_model_dir(src, work_dir / name / "bf16")
    compressed = work_dir / name / "ember"
    compress_model_dir(bf16, compressed, progress=False)
    return LoadPair(name, {"bf16": bf16, "ember": compressed}, _is_decoder(bf16))


def _is_decoder(model_dir: Path) -> bool:
    try:
        read_config(model_dir)
    except ValueError:  # not an architecture ember serves (e.g. BERT)
        return False
    return True


def measure_load(pair: LoadPair, repeats: int) -> dict:
    """Per operation and variant: cold times (each after dropping the files from the page
    cache), the best of them, a warm time; and the compressed/uncompressed ratio of the best."""
    files = {v: find_weight_files(d) for v, d in pair.dirs.items()}
    dests = _preallocate(files["bf16"])
    ops: dict[str, Callable[[str], object]] = {
        "read": lambda v: read_files(files[v]),
        "tensors": lambda v: read_tensors(files[v], dests),
    }
    if pair.is_decoder:
        ops["load_model"] = lambda v: load_model(pair.dirs[v], dtype="bfloat16")
    result = {"name": pair.name, "is_decoder": pair.is_decoder,
              "bytes": {v: sum(f.stat().st_size for f in fs) for v, fs in files.items()},
              "cache_drop": check_cache_drop(files["bf16"]), "ops": {}}
    for op, fn in ops.items():
        result["ops"][op] = _time_op(fn, files, repeats)
    return result


def _time_op(fn: Callable[[str], object], files: dict[str, list[Path]], repeats: int) -> dict:
    for variant in VARIANTS:  # first calls pay one-off costs (imports, thread pools)
        _seconds(fn, variant)
    timings = {v: {"cold_s": [], "warm_s": _seconds(fn, v)} for v in VARIANTS}
    for _ in range(max(1, repeats)):
        for variant in VARIANTS:  # interleaved, so drift on a shared machine hits both
            drop_from_page_cache(files[variant])
            timings[variant]["cold_s"].append(_seconds(fn, variant))
    for timing in timings.values():
        timing["best_cold_s"] = min(timing["cold_s"])
    return {**timings,
            "ratio": timings["ember"]["best_cold_s"] / timings["bf16"]["best_cold_s"]}


def _seconds(fn: Callable[[str], object], variant: str) -> float:
    start = time.perf_counter()
    out = fn(variant)
    elapsed = time.perf_counter() - start
    del out
    gc.collect()
    return elapsed


def _preallocate(files: list[Path]) -> dict[str, torch.Tensor]:
    dests = {}
    for file in files:
        with WeightsFile(file) as f:
            for name in f.keys():
                dests[name] = torch.empty(f.shape(name), dtype=_DTYPES[f.dtype(name)])
    return dests


def read_tensors(files: list[Path], dests: dict[str, torch.Tensor]) -> None:
    """Every tensor of `files` into its preallocated tensor (compressed ones decoded there)."""
    for file in files:
        with WeightsFile(file) as f:
            for name in f.keys():
                f.copy_into(name, dests[name])
