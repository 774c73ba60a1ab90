"""`ember bench fleet-sim-calibrate`: measures ember's real engine step by step and fits the
simulator's step-time model (step_model.py), saved as JSON with the raw steps.

Drives an in-process `LLM`; steps are timed by wrapping methods on the instance (the engine
code is not changed). Prefix caching stays on: a decode batch shares one prefix, so long
contexts are cheap to set up, and only the tokens a step computes are counted.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from ember.bench.fleet_sim.step_model import StepModel, StepStats, fit_quality, fit_step_model
from ember.bench.models import MODEL_SIZES, bench_model_name


@dataclass(frozen=True)
class CalibrationConfig:
    model_size: str = "10m"
    model_dir: Path | None = None  # default: the bench shape of model_size, 16k context
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 1.0
    num_threads: int = 1  # one core per simulated worker: the other is left to the machine
    prefill_lens: tuple[int, ...] = (256, 2048, 6144)  # one fresh prompt each
    # (batch, context) of decode runs: the batch shares a prefix, so it is computed once
    decode_grid: tuple[tuple[int, int], ...] = ((1, 512), (8, 512), (32, 512), (96, 512),
                                                (8, 4096), (32, 4096), (2, 8192))
    decode_steps: int = 16
    num_mixed: int = 24  # requests of the mixed run, all queued at once
    mixed_prompt_lens: tuple[int, int] = (256, 4000)  # uniform in this range
    mixed_output_lens: tuple[int, int] = (16, 64)
    repeats: int = 3  # each step's time is the fastest of its repeats
    seed: int = 0


def calibration_model_dir(size: str) -> Path:
    """The bench model of `size` with a 16k context, so histories of several thousand tokens
    can be measured (same weights recipe as ember/bench/models.py otherwise)."""
    from ember.model.demo import cached_model_dir

    return cached_model_dir(f"{bench_model_name(size)}-ctx16k", architecture="LlamaForCausalLM",
                            dtype="bfloat16", max_position_embeddings=16384,
                            **MODEL_SIZES[size])


class _StepRecorder:
    """Times every `EngineCore.step` and records what its SchedulerOutput computed."""

    def __init__(self, engine: Any) -> None:
        self.samples: list[tuple[StepStats, float]] = []
        self._stats: StepStats | None = None
        execute, step = engine.runner.execute, engine.step

        def recording_execute(sched: Any, *args: Any) -> Any:
            self._stats = StepStats()
            for chunk in sched.chunks:
                is_decode = chunk.num_tokens == 1 and chunk.start_pos >= chunk.seq.num_prompt_tokens
                self._stats.add_chunk(chunk.start_pos, chunk.num_tokens, is_decode)
            return execute(sched, *args)

        def timed_step() -> Any:
            self._stats = None
            t0 = time.perf_counter()
            out = step()
            elapsed = time.perf_counter() - t0
            if self._stats is not None:
                self.samples.append((self._stats, elapsed))
            return out

        engine.runner.execute = recording_execute
        engine.step = timed_step


Scenario = tuple[str, list[list[int]], list[int]]  # (kind, prompts, max_tokens)


def _scenarios(cfg: CalibrationConfig, rng: random.Random, vocab_size: int) -> list[Scenario]:
    """The runs of one repeat: token ids from `rng`, lengths fixed by the config's seed."""

    def fresh(num: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(num)]

    scenarios: list[Scenario] = [("prefill", [fresh(n)], [1]) for n in cfg.prefill_lens]
    for batch, context in cfg.decode_grid:
        prefix = fresh(context - 16)
        scenarios.append(("decode", [prefix + fresh(16) for _ in range(batch)],
                          [cfg.decode_steps] * batch))
    lengths = random.Random(f"{cfg.seed}-mixed")
    prompt_lens = [lengths.randint(*cfg.mixed_prompt_lens) for _ in range(cfg.num_mixed)]
    outputs = [lengths.randint(*cfg.mixed_output_lens) for _ in range(cfg.num_mixed)]
    scenarios.append(("mixed", [fresh(n) for n in prompt_lens], outputs))
    return scenarios


def _run(llm: Any, recorder: _StepRecorder, prompts: list[list[int]],
         max_tokens: list[int]) -> list[tuple[StepStats, float]]:
    from ember import SamplingParams

    start = len(recorder.samples)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    llm.generate(prompts, params)
    return recorder.samples[start:]


def _fastest(repeats: list[list[tuple[StepStats, float]]]) -> list[tuple[StepStats, float]]:
    """Step by step, the fastest repeat (a shared machine only ever adds time); every step of
    every repeat when the repeats did not schedule identically."""
    if any([s for s, _ in r] != [s for s, _ in repeats[0]] for r in repeats):
        return [sample for r in repeats for sample in r]
    return [(stats, min(r[i][1] for r in repeats)) for i, (stats, _) in enumerate(repeats[0])]


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_steps(cfg: CalibrationConfig, model_dir: Path) -> dict[str, list]:
    """{scenario kind: [(stats, fastest seconds) per step]} from the real engine."""
    from ember import LLM

    llm = LLM(str(model_dir), max_num_seqs=cfg.max_num_seqs,
              max_num_batched_tokens=cfg.max_num_batched_tokens,
              kv_cache_memory=int(cfg.kv_cache_gib * (1 << 30)), num_threads=cfg.num_threads)
    recorder = _StepRecorder(llm.engine)
    vocab_size = llm.engine.model_info.vocab_size
    warm_up = _scenarios(cfg, random.Random(f"{cfg.seed}-warm-up"), vocab_size)[-1]
    warm_prompts = warm_up[1][:4]
    _run(llm, recorder, warm_prompts, [2] * len(warm_prompts))
    runs: dict[tuple[int, str], list[list]] = {}
    for repeat in range(cfg.repeats):
        rng = random.Random(f"{cfg.seed}-tokens-{repeat}")
        for idx, (kind, prompts, max_tokens) in enumerate(_scenarios(cfg, rng, vocab_size)):
            runs.setdefault((idx, kind), []).append(_run(llm, recorder, prompts, max_tokens))
    steps: dict[str, list] = {}
    for (_, kind), repeats in runs.items():
        steps.setdefault(kind, []).extend(_fastest(repeats))
    return steps


def run_calibration(cfg: CalibrationConfig) -> dict[str, Any]:
    model_dir = cfg.model_dir or calibration_model_dir(cfg.model_size)
    busy0, own0, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    steps = measure_steps(cfg, model_dir)
    wall_s = time.perf_counter() - t0
    other_cpu = _busy_cpu_s() - busy0 - (_own_cpu_s() - own0)
    fit_set, mixed = steps["prefill"] + steps["decode"], steps["mixed"]
    held_out_model = fit_step_model(fit_set)
    model = fit_step_model(fit_set + mixed)
    return {
        "step_model": model.to_json(),
        "fit": fit_quality(model, fit_set + mixed),
        "held_out": {"fit_on": "prefill-only and decode-only runs, checked on the mixed run",
                     "step_model": held_out_model.to_json(),
                     "mixed_run": fit_quality(held_out_model, mixed)},
        "engine": {"model_dir": str(model_dir), "model": _model_facts(model_dir),
                   "max_num_seqs": cfg.max_num_seqs,
                   "max_num_batched_tokens": cfg.max_num_batched_tokens,
                   "num_threads": cfg.num_threads, "block_size": 16},
        "speeds": _speeds(model),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "num_cpus": os.cpu_count(), "wall_s": wall_s,
                    "other_cpu_percent": 100.0 * max(other_cpu, 0.0)
                    / (wall_s * (os.cpu_count() or 1))},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "steps": {"columns": ["kind", "seconds", "prefill_tokens", "prefill_pairs",
                              "decode_seqs", "decode_context"],
                  "rows": [[kind, t, s.prefill_tokens, s.prefill_pairs, s.decode_seqs,
                            s.decode_context] for kind, samples in steps.items()
                           for s, t in samples]},
    }


def _model_facts(model_dir: Path) -> dict[str, Any]:
    """Shape and KV bytes per token (bf16 K and V over all layers)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    return {"name": Path(model_dir).name, "hidden_size": config["hidden_size"],
            "num_layers": config["num_hidden_layers"], "kv_bytes_per_token": kv_bytes}


def _speeds(model: StepModel) -> dict[str, float]:
    """Readable consequences of the fit: prefill and decode rates at a few shapes."""
    def prefill_tok_s(context: int) -> float:
        stats = StepStats()
        stats.add_chunk(context, 2048, is_decode=False)
        return 2048 / model.step_s(stats)

    def decode_step_ms(batch: int, context: int) -> float:
        stats = StepStats()
        for _ in range(batch):
            stats.add_chunk(context, 1, is_decode=True)
        return 1000 * model.step_s(stats)

    return {"prefill_tok_s_2048_chunk_at_0": prefill_tok_s(0),
            "prefill_tok_s_2048_chunk_at_4096": prefill_tok_s(4096),
            "decode_step_ms_batch1_ctx1024": decode_step_ms(1, 1024),
            "decode_step_ms_batch32_ctx4096": decode_step_ms(32, 4096),
            "decode_step_ms_batch64_ctx1024": decode_step_ms(64, 1024)}


def write_calibration(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
