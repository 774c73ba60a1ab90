"""Runs one throughput measurement with vLLM's CPU build; executed by vLLM's own python.

Imports only vllm and the standard library (ember is not installed in vLLM's venv).
Usage: `python vllm_runner.py SPEC.json RESULT.json` (spec and result as in throughput.py).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

# NOTE: read by vLLM at import time, so set before `import vllm`; the orchestrator may override.
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def _requests(workload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload["requests"]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True)
        for r in workload["requests"]
    ]
    return prompts, params


def run(spec: dict[str, Any]) -> dict[str, Any]:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import vllm
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        seed=0,
        enforce_eager=spec.get("enforce_eager", False),
    )
    load_s = time.perf_counter() - t0

    prompts, params = _requests(spec["warmup"])
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    warmup_s = time.perf_counter() - t0

    runs = []
    for workload in spec["workloads"]:  # repeats: same lengths, fresh token ids
        prompts, params = _requests(workload)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall_s = time.perf_counter() - t0
        runs.append({"wall_s": wall_s,
                     "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs]})

    return {
        "engine": "vllm",
        "version": vllm.__version__,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "runs": runs,
        "settings": {**{k: os.environ[k] for k in ENV_DEFAULTS},
                     "kv_cache_dtype": spec.get("kv_cache_dtype", "auto")},
        "ru_maxrss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "ru_maxrss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
