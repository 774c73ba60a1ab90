"""`ember bench throughput`: ember vs vLLM's CPU build vs transformers, one engine at a time.

Owns the run order, the child-process protocol (spec/result JSON), RSS sampling and reporting;
each engine runs alone in its own subprocess (runners.py, vllm_runner.py) and never in this one.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ember.bench.models import MODEL_SIZES, build_bench_model, count_parameters
from ember.bench.workload import Workload, make_workload

ENGINES = ("ember", "vllm", "transformers")
VLLM_RUNNER = Path(__file__).with_name("vllm_runner.py")


@dataclass(frozen=True)
class ThroughputConfig:
    model_sizes: tuple[str, ...] = ("10m", "250m")
    num_prompts: int = 64
    engines: tuple[str, ...] = ENGINES
    vllm_python: str = "/work/venvs/vllm/bin/python"
    out_dir: Path = Path("bench-results")
    seed: int = 0
    num_warmup: int = 8
    repeats: int = 1  # timed runs per engine (fresh prompts, same lengths); the fastest counts
    dtype: str = "bfloat16"
    kv_cache_gib: float = 4.0  # the same KV budget for ember and vLLM
    kv_cache_dtype: str = "auto"  # the same KV dtype name for both (auto, fp8, ...)
    max_model_len: int = 1024
    timeout_s: float = 1800.0
    cache_dir: Path | None = None  # TMPDIR and compile caches for the vLLM child
    model_dir: Path | None = None  # use this model instead of building model_sizes
    quiet_wait_s: float = 0.0  # before each engine, wait up to this long for an idle machine
    ember_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = sorted(set(self.engines) - set(ENGINES))
        if unknown:
            raise ValueError(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
        sizes = sorted(set(self.model_sizes) - set(MODEL_SIZES))
        if sizes and self.model_dir is None:
            raise ValueError(f"unknown model size(s) {sizes}; known: {list(MODEL_SIZES)}")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


class _RssSampler:
    """Peak summed RSS of a process and all its descendants, sampled from this process."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self._cpu_s: dict[int, float] = {}  # last CPU seconds seen per process of the tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.wait(self.interval_s):
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                        cpu = proc.cpu_times()
                        self._cpu_s[proc.pid] = cpu.user + cpu.system
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak_bytes = max(self.peak_bytes, total)

    @property
    def tree_cpu_s(self) -> float:
        """CPU seconds of the tree, including descendants its root never reaped."""
        return sum(self._cpu_s.values())


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait_s: float, max_busy_percent: float = 10.0) -> dict[str, float]:
    """Wait (up to max_wait_s) until the machine's CPUs are idle over a 2 s window."""
    t0 = time.perf_counter()
    busy = psutil.cpu_percent(interval=2.0)
    while busy > max_busy_percent and time.perf_counter() - t0 < max_wait_s:
        busy = psutil.cpu_percent(interval=2.0)
    return {"waited_s": time.perf_counter() - t0, "busy_percent_before": busy}


def _child_command(engine: str, cfg: ThroughputConfig, spec_path: Path,
                   result_path: Path) -> list[str]:
    if engine == "vllm":
        return [cfg.vllm_python, str(VLLM_RUNNER), str(spec_path), str(result_path)]
    return [sys.executable, "-m", "ember.bench.runners", engine, str(spec_path), str(result_path)]


def _child_env(engine: str, cfg: ThroughputConfig) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if engine == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gib:g}")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if cfg.cache_dir is not None:
            for key, sub in (("TMPDIR", "tmp"), ("VLLM_CACHE_ROOT", "vllm"),
                             ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
                path = cfg.cache_dir / sub
                path.mkdir(parents=True, exist_ok=True)
                env.setdefault(key, str(path))
    return env


def run_engine(engine: str, spec: dict[str, Any], cfg: ThroughputConfig) -> dict[str, Any]:
    """Run one engine alone in a subprocess; returns its result plus wall-clock and RSS facts."""
    with tempfile.TemporaryDirectory(prefix=f"ember-bench-{engine}-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log_path = cfg.out_dir / f"{Path(spec['model']).name}-{engine}.log"
        busy0, own0 = _busy_cpu_s(), _children_cpu_s()
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen(_child_command(engine, cfg, spec_path, result_path),
                                        stdout=log, stderr=subprocess.STDOUT,
                                        env=_child_env(engine, cfg))
            except OSError as err:  # e.g. no vLLM venv at --vllm-python
                return {"engine": engine, "error": f"cannot start {engine}: {err}"}
            with _RssSampler(proc.pid) as sampler:
                try:
                    returncode = proc.wait(timeout=cfg.timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    returncode = -9
        process_s = time.perf_counter() - t0
        own_cpu_s = max(_children_cpu_s() - own0, sampler.tree_cpu_s)
        foreign_cpu_s = (_busy_cpu_s() - busy0) - own_cpu_s
        if returncode != 0 or not result_path.exists():
            tail = log_path.read_text()[-2000:]
            return {"engine": engine, "error": f"exit code {returncode}", "log_tail": tail}
        result = json.loads(result_path.read_text())
    result["process_s"] = process_s
    # CPU seconds used by other processes on the machine while this engine ran (noise check).
    result["foreign_cpu_s"] = max(0.0, foreign_cpu_s)
    result["foreign_cpu_frac"] = max(0.0, foreign_cpu_s) / (process_s * (os.cpu_count() or 1))
    result["peak_rss_tree_bytes"] = sampler.peak_bytes
    return result


def _score(result: dict[str, Any], workloads: list[Workload]) -> dict[str, Any]:
    """Useful output tokens/s: each request counts only its own requested tokens.

    With repeats, the fastest run is reported (the least disturbed by anything else on the
    machine) and every run's wall time is kept; all repeats have the same lengths.
    """
    runs = result.pop("runs")
    exact, useful_per_run = True, []
    for run, workload in zip(runs, workloads):
        got = [len(t) for t in run["output_token_ids"]]
        want = [r.max_tokens for r in workload.requests]
        useful_per_run.append(sum(min(g, w) for g, w in zip(got, want)))
        exact = exact and got == want
    best = min(range(len(runs)), key=lambda i: runs[i]["wall_s"])
    wall_s, useful = runs[best]["wall_s"], useful_per_run[best]
    result["wall_s"] = wall_s
    result["wall_s_runs"] = [run["wall_s"] for run in runs]
    result["num_useful_tokens"] = useful
    result["exact_lengths"] = exact
    result["output_tok_s"] = useful / wall_s
    result["total_tok_s"] = (useful + workloads[best].num_prompt_tokens) / wall_s
    result["_token_ids"] = runs[0]["output_token_ids"]
    return result


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy outputs are identical (bf16: expect few)."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def bench_model(model_dir: Path, label: str, cfg: ThroughputConfig) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    # Repeats get fresh token ids (no prefix-cache hits) but the same set of lengths.
    workloads = [make_workload(cfg.num_prompts, config["vocab_size"], seed=cfg.seed + 1000 * i)
                 for i in range(cfg.repeats)]
    workload = workloads[0]
    warmup = make_workload(cfg.num_warmup, config["vocab_size"], seed=cfg.seed + 1,
                           output_len_range=(4, 16))
    spec = {"model": str(model_dir), "dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
            "kv_cache_gib": cfg.kv_cache_gib, "kv_cache_dtype": cfg.kv_cache_dtype,
            "workloads": [w.to_json() for w in workloads],
            "warmup": warmup.to_json(), "ember_options": cfg.ember_options}
    results: dict[str, dict[str, Any]] = {}
    for engine in cfg.engines:
        quiet = wait_for_quiet(cfg.quiet_wait_s) if cfg.quiet_wait_s > 0 else {}
        print(f"[bench] {label}: running {engine} ...", file=sys.stderr, flush=True)
        result = run_engine(engine, spec, cfg)
        result.update(quiet)
        if "error" not in result:
            result = _score(result, workloads)
            print(f"[bench] {label}: {engine} {result['output_tok_s']:.0f} output tok/s "
                  f"({result['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        else:
            print(f"[bench] {label}: {engine} failed: {result['error']}", file=sys.stderr)
        results[engine] = result
    ratios: dict[str, float] = {}
    agreement: dict[str, float] = {}
    ember = results.get("ember", {})
    for other in ("vllm", "transformers"):
        if "output_tok_s" in ember and "output_tok_s" in results.get(other, {}):
            ratios[f"ember/{other}"] = ember["output_tok_s"] / results[other]["output_tok_s"]
            agreement[f"ember=={other}"] = _agreement(ember["_token_ids"],
                                                      results[other]["_token_ids"])
    for result in results.values():
        result.pop("_token_ids", None)
    return {
        "model": label, "model_dir": str(model_dir), "model_config": config,
        "num_params": count_parameters(config),
        "workload": {"num_requests": len(workload.requests), "seed": workload.seed,
                     "num_prompt_tokens": workload.num_prompt_tokens,
                     "num_output_tokens": workload.num_output_tokens},
        "engines": results, "ratios": ratios, "identical_outputs": agreement,
    }


def machine_info() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "num_cpus": os.cpu_count(), "memory_gib": round(vm.total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def code_version() -> dict[str, Any]:
    """The ember commit measured, and whether ember/ had uncommitted changes (read-only git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ember"], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty_files": dirty.splitlines()}


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| model | params | engine | output tok/s | wall s | load s | peak RSS GiB "
        "| exact lengths | other CPU % |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in report["runs"]:
        params = f"{run['num_params']['total'] / 1e6:.1f}M"
        for engine, r in run["engines"].items():
            if "error" in r:
                lines.append(f"| {run['model']} | {params} | {engine} | failed: {r['error']} "
                             "| | | | | |")
                continue
            lines.append(
                f"| {run['model']} | {params} | {engine} | {r['output_tok_s']:,.0f} | "
                f"{r['wall_s']:.1f} | {r['load_s']:.1f} | "
                f"{r['peak_rss_tree_bytes'] / 2**30:.2f} | "
                f"{'yes' if r['exact_lengths'] else 'NO'} | {100 * r['foreign_cpu_frac']:.0f} |")
    ratio_lines = []
    for run in report["runs"]:
        for name, value in run["ratios"].items():
            ratio_lines.append(f"- {run['model']}: {name} = **{value:.2f}×**")
    return "\n".join(lines + ([""] + ratio_lines if ratio_lines else [])) + "\n"


def run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    cfg.validate()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model_dir is not None:
        models = [(cfg.model_dir, cfg.model_dir.name)]
    else:
        models = [(build_bench_model(size), size) for size in cfg.model_sizes]
    report = {"machine": machine_info(), "command": " ".join(sys.argv), "code": code_version(),
              "config": {"num_prompts": cfg.num_prompts, "engines": list(cfg.engines),
                         "seed": cfg.seed, "dtype": cfg.dtype, "kv_cache_gib": cfg.kv_cache_gib,
                         "max_model_len": cfg.max_model_len, "num_warmup": cfg.num_warmup,
                         "repeats": cfg.repeats, "kv_cache_dtype": cfg.kv_cache_dtype},
              "runs": [bench_model(model_dir, label, cfg) for model_dir, label in models]}
    (cfg.out_dir / "throughput.json").write_text(json.dumps(report, indent=2))
    (cfg.out_dir / "throughput.md").write_text(to_markdown(report))
    return report
