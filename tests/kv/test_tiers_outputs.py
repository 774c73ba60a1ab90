"""The tiers end to end through the engine (fp32, greedy): prefixes evicted from a small device
pool come back from the CPU tier or the disk tier with outputs identical to caching off; a
restarted engine starts warm from disk; corrupt or deleted disk files are recomputed."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.kv.disk_tier import SUFFIX
from ember.model.demo import build_random_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BLOCK_BYTES = 8192  # this model: 2 layers x K,V x 2 heads x 16 tokens x 16 dims x 4 bytes
POOL = {"kv_cache_memory": 24 * BLOCK_BYTES}  # 24 blocks: the filler evicts the agents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", seed=21)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _ids(0, 64)  # 4 blocks shared by every agent turn
AGENTS = [{"prompt_token_ids": SYSTEM + _ids(i, 20)} for i in range(1, 4)]
FILLER = [{"prompt_token_ids": _ids(100 + i, 60)} for i in range(12)]  # evicts the agents


def _run(llm: LLM, prompts) -> tuple[list[list[int]], list[int]]:
    results = llm.generate(prompts, GREEDY)
    return [r.outputs[0].token_ids for r in results], [r.num_cached_tokens for r in results]


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(str(model_dir), dtype="float32", enable_prefix_caching=False, **POOL)
    return _run(llm, AGENTS)[0]


def _agents_after_filler(llm: LLM) -> tuple[list[list[int]], list[int]]:
    _run(llm, AGENTS)
    for prompt in FILLER:  # one at a time: the agents' blocks leave the device
        _run(llm, [prompt])
    return _run(llm, AGENTS)


def test_device_only_loses_evicted_prefixes(model_dir, reference):
    llm = LLM(str(model_dir), dtype="float32", **POOL)
    outputs, cached = _agents_after_filler(llm)
    assert outputs == reference
    assert cached[0] == 0  # evicted: recomputed


def test_cpu_tier_brings_evicted_prefixes_back(model_dir, reference):
    llm = LLM(str(model_dir), dtype="float32", kv_cpu_bytes=256 * BLOCK_BYTES, **POOL)
    outputs, cached = _agents_after_filler(llm)
    assert outputs == reference
    assert cached[0] == 80 and min(cached) >= 64  # 4 system blocks (+ its own 1) from host


def test_disk_tier_round_trip_restart_and_damage(model_dir, reference, tmp_path):
    disk = {"kv_disk_dir": str(tmp_path), "kv_disk_bytes": 64 << 20}
    llm = LLM(str(model_dir), dtype="float32", **POOL, **disk)
    outputs, cached = _agents_after_filler(llm)  # 16 staging blocks: the rest spill to disk
    assert outputs == reference and cached[0] == 80
    llm.close()
    assert list(tmp_path.glob(f"*{SUFFIX}"))

    restarted = LLM(str(model_dir), dtype="float32", **POOL, **disk)
    outputs, cached = _run(restarted, AGENTS)
    assert outputs == reference and min(cached) >= 64  # warm from disk
    restarted.close()

    files = sorted(tmp_path.glob(f"*{SUFFIX}"))
    for i, path in enumerate(files):
        if i % 2:
            path.unlink()
        else:
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0x55
            path.write_bytes(bytes(blob))
    damaged = LLM(str(model_dir), dtype="float32", **POOL, **disk)
    outputs, cached = _run(damaged, AGENTS)
    assert outputs == reference  # every damaged block was a miss and was recomputed
    assert cached[0] == 0
    damaged.close()


def test_an_fp8_cache_round_trips_through_both_tiers(model_dir, tmp_path):
    """fp8 blocks (a quarter of the fp32 bytes) come back from the CPU tier, and from the disk
    tier after a restart, with outputs identical to an fp8 engine that never cached."""
    fp8 = {"kv_cache_dtype": "fp8", "kv_cache_memory": 24 * BLOCK_BYTES // 4}
    expected = _run(LLM(str(model_dir), dtype="float32", enable_prefix_caching=False, **fp8),
                    AGENTS)[0]
    cpu = LLM(str(model_dir), dtype="float32", kv_cpu_bytes=256 * BLOCK_BYTES // 4, **fp8)
    outputs, cached = _agents_after_filler(cpu)
    assert outputs == expected and cached[0] == 80
    disk = {"kv_disk_dir": str(tmp_path), "kv_disk_bytes": 64 << 20}
    _agents_after_filler(LLM(str(model_dir), dtype="float32", **disk, **fp8))
    outputs, cached = _run(LLM(str(model_dir), dtype="float32", **disk, **fp8), AGENTS)
    assert outputs == expected and cached[0] >= 64  # a restarted engine, warm from disk
