"""Child-process runners for ember and transformers: load, warm up, time one generate call.

Each runs alone in its own process (`python -m ember.bench.runners ENGINE SPEC RESULT`);
the orchestrator in throughput.py owns the spec and result formats and all reporting.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

from ember.bench.workload import Workload


def _rusage() -> dict[str, int]:
    return {
        "ru_maxrss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "ru_maxrss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


def run_ember(spec: dict[str, Any]) -> dict[str, Any]:
    import ember
    from ember import LLM, SamplingParams

    def requests(workload: Workload) -> tuple[list[dict[str, Any]], list[SamplingParams]]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
                  for r in workload.requests]
        return prompts, params

    t0 = time.perf_counter()
    llm = LLM(spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              kv_cache_memory=int(spec["kv_cache_gib"] * 2**30),
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"), **spec.get("ember_options", {}))
    load_s = time.perf_counter() - t0

    prompts, params = requests(Workload.from_json(spec["warmup"]))
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    warmup_s = time.perf_counter() - t0

    runs = []
    for data in spec["workloads"]:  # repeats: same lengths, fresh token ids
        prompts, params = requests(Workload.from_json(data))
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params)
        wall_s = time.perf_counter() - t0
        runs.append({"wall_s": wall_s,
                     "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
    return {
        "engine": "ember",
        "version": getattr(ember, "__version__", "dev"),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "runs": runs,
        "settings": {"kv_cache_gib": spec["kv_cache_gib"],
                     "kv_cache_dtype": spec.get("kv_cache_dtype", "auto"),
                     **spec.get("ember_options", {})},
        **_rusage(),
    }


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """One static batch, left padded, greedy; every row runs to the longest output length."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch,
                                                                              spec["dtype"]))
    model.eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def generate(workload: Workload) -> list[list[int]]:
        reqs = workload.requests
        max_prompt = max(len(r.prompt_token_ids) for r in reqs)
        max_new = max(r.max_tokens for r in reqs)
        input_ids = torch.full((len(reqs), max_prompt), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(reqs), max_prompt), dtype=torch.int64)
        for i, r in enumerate(reqs):
            n = len(r.prompt_token_ids)
            input_ids[i, max_prompt - n:] = torch.tensor(r.prompt_token_ids)
            mask[i, max_prompt - n:] = 1
        config = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new,
                                  do_sample=False, eos_token_id=None, pad_token_id=pad_id)
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new = out[:, max_prompt:]  # [batch, max_new]
        if new.shape[1] != max_new:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens, not {max_new}")
        # Useful tokens: each request's own length; the rest of its row is overrun.
        return [new[i, : r.max_tokens].tolist() for i, r in enumerate(reqs)]

    t0 = time.perf_counter()
    generate(Workload.from_json(spec["warmup"]))
    warmup_s = time.perf_counter() - t0

    runs = []
    for data in spec["workloads"]:  # repeats: same lengths, fresh token ids
        t0 = time.perf_counter()
        token_ids = generate(Workload.from_json(data))
        runs.append({"wall_s": time.perf_counter() - t0, "output_token_ids": token_ids})
    return {
        "engine": "transformers",
        "version": transformers.__version__,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "runs": runs,
        "settings": {"num_threads": torch.get_num_threads(),
                     "attn_implementation": model.config._attn_implementation},
        **_rusage(),
    }


RUNNERS = {"ember": run_ember, "transformers": run_transformers}


def main(argv: list[str] | None = None) -> None:
    engine, spec_path, result_path = argv or sys.argv[1:]
    with open(spec_path) as f:
        spec = json.load(f)
    result = RUNNERS[engine](spec)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
