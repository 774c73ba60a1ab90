"""Interleaved A/B of a prefill worker's KV send modes: the same prompt length is prefilled
by a `layerwise` and a `per-step` prefill core in alternating order, each writing into a
decode core's reservation over a real transport, and the whole prefill (compute + KV writes)
is timed, with the part of it spent waiting for writes after the forward.

    python benchmarks/disagg/ab_kv_send_mode.py 250m --backend shm --prompt-len 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

from ember.bench.models import build_bench_model
from ember.config import EngineConfig
from ember.engine.engine_core import EngineCore
from ember.engine.messages import EngineCoreRequest
from ember.engine.sampling_params import SamplingParams

MODES = ("layerwise", "per-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_size", choices=("10m", "250m"))
    parser.add_argument("--backend", default="shm", choices=("shm", "mooncake"))
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7, help="The first is not timed.")
    args = parser.parse_args()
    model = str(build_bench_model(args.model_size))

    def core(role: str, **options: object) -> EngineCore:
        return EngineCore(EngineConfig.from_options(
            model, role=role, kv_transfer_backend=args.backend, kv_cache_memory=1 << 30,
            device="cpu", max_num_batched_tokens=max(2048, args.prompt_len), **options))

    decode = core("decode")
    prefills = {mode: core("prefill", kv_send_mode=mode) for mode in MODES}
    step_s: dict[str, list[float]] = {mode: [] for mode in MODES}
    wait_s: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                elapsed, waited = _prefill(prefills[mode], decode, f"{mode}-{r}",
                                           args.prompt_len, seed=2 * r + MODES.index(mode))
                if r:
                    step_s[mode].append(elapsed)
                    wait_s[mode].append(waited)
        for mode in MODES:
            sender = prefills[mode].kv_sender
            print(f"{mode:>9}: prefill median {statistics.median(step_s[mode]) * 1e3:.1f} ms "
                  f"(runs {[round(t * 1e3) for t in step_s[mode]]}), waited after the forward "
                  f"{statistics.median(wait_s[mode]) * 1e3:.2f} ms, copies at "
                  f"{sender.num_bytes_sent / sender.seconds_sending / 1e9:.2f} GB/s")
    finally:
        for c in (decode, *prefills.values()):
            c.close()


def _prefill(prefill: EngineCore, decode: EngineCore, rid: str, prompt_len: int,
             seed: int) -> tuple[float, float]:
    prompt = [(seed * 7919 + 13 * i) % 30000 + 10 for i in range(prompt_len)]  # uncached
    reply = decode.reserve_kv(rid, prompt)
    prefill.add_request(EngineCoreRequest(
        rid, prompt, SamplingParams(max_tokens=1), 0.0,
        {"do_remote_decode": True, "peer": reply["peer"], "block_ids": reply["block_ids"],
         "first_block": reply["first_block"]}))
    waited = prefill.kv_sender.seconds_waiting
    start = time.perf_counter()
    while prefill.has_unfinished:
        prefill.step()
    elapsed = time.perf_counter() - start
    if failures := prefill.take_failures():
        raise RuntimeError(f"transfer failed: {failures}")
    decode.release_kv(rid)
    return elapsed, prefill.kv_sender.seconds_waiting - waited


if __name__ == "__main__":
    main()
