"""Interleaved A/B of decode steps inside one engine: even steps run variant B (the current
code), odd steps variant A, so both see the same batch, contexts and machine state.

    python benchmarks/cpu/ab_decode_step.py ops 250m 64 40       # fused C ops vs PyTorch's
    python benchmarks/cpu/ab_decode_step.py attention 250m 64 40 --old-kernel OLD.c

`attention` compares the current C attention kernel with one built from another source file
(e.g. `git show 6484e2a:ember/attention/csrc/paged_attention.c > OLD.c`). PROMPT_LEN sets
each sequence's context before the timed steps (default 128). NEW_PROMPT_LEN > 0 makes every
timed step a mixed one: a fresh prompt of that many tokens (one output token) joins it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import time
from pathlib import Path

from ember.attention import cpu_kernel
from ember.bench.models import build_bench_model
from ember.config import EngineConfig
from ember.engine.engine_core import EngineCore
from ember.engine.messages import EngineCoreRequest
from ember.engine.sampling_params import SamplingParams
from ember.model import layers
from ember.native import load_c_library


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["ops", "attention"])
    parser.add_argument("model_size")
    parser.add_argument("batch", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--old-kernel", type=Path)
    args = parser.parse_args()

    config = EngineConfig.from_options(str(build_bench_model(args.model_size)),
                                       dtype="bfloat16", kv_cache_memory=1 << 30,
                                       max_num_seqs=128)
    core = EngineCore(config)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4096)
    prompt_len = int(os.environ.get("PROMPT_LEN", "128"))
    for i in range(args.batch):
        prompt = [rng.randrange(16, 30000) for _ in range(prompt_len)]
        core.add_request(EngineCoreRequest(f"ab-{i}", prompt, params, time.monotonic()))
    for _ in range(40):  # every prompt prefilled (2048-token steps), then warm decode steps
        core.step()

    new_lib = core.runner.backend._lib
    old_lib = None
    if args.what == "attention":
        old_lib = load_c_library("paged_attention_ab", args.old_kernel.read_bytes(),
                                 cpu_kernel._FLAGS, cpu_kernel._LINK_FLAGS)
        for name in ("paged_attention_f32", "paged_attention_bf16"):
            getattr(old_lib, name).restype = ctypes.c_int
        if not hasattr(old_lib, "write_kv"):  # sources before write_kv: compare attention only
            old_lib.write_kv = new_lib.write_kv

    def use(new: bool) -> None:
        if args.what == "ops":
            layers._cpu_fusion_on = (lambda: True) if new else (lambda: False)
        else:
            core.runner.backend._lib = new_lib if new else old_lib

    new_prompt_len = int(os.environ.get("NEW_PROMPT_LEN", "0"))
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps):
        new = i % 2 == 0
        use(new)
        if new_prompt_len:
            prompt = [rng.randrange(16, 30000) for _ in range(new_prompt_len)]
            core.add_request(EngineCoreRequest(f"mixed-{i}", prompt,
                                               SamplingParams(max_tokens=1), time.monotonic()))
        t0 = time.perf_counter()
        core.step()
        times[new].append(time.perf_counter() - t0)
    for new in (False, True):
        print(f"{args.what} {'B (current)' if new else 'A'}: median "
              f"{statistics.median(times[new]) * 1e3:.2f} ms, min {min(times[new]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
