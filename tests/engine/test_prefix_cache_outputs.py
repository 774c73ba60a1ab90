"""Prefix caching changes no output: greedy fp32 tokens with caching off, on (cold), and on with
hits (shared system prompts, a fully cached prompt, n > 1, a small pool that preempts)."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.model.demo import build_random_model

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", seed=5)


def _prompts() -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    system = torch.randint(5, 1000, (37,), generator=gen).tolist()
    prompts = [system + torch.randint(5, 1000, (n,), generator=gen).tolist()
               for n in (1, 5, 16, 23)]
    prompts.append(system[:32])  # a whole number of blocks: fully cached on the second pass
    return [{"prompt_token_ids": p} for p in prompts]


def _run(llm: LLM, prompts, params=GREEDY):
    results = llm.generate(prompts, params)
    return [[o.token_ids for o in r.outputs] for r in results], [r.num_cached_tokens
                                                                for r in results]


@pytest.mark.parametrize("options", [
    {},
    {"kv_cache_memory": 12 * 8192},  # 12 blocks of 8 KiB: the batch preempts
])
def test_outputs_identical_with_caching_off_and_on(model_dir, options):
    prompts = _prompts()
    reference, cached = _run(LLM(str(model_dir), dtype="float32", enable_prefix_caching=False,
                                 **options), prompts)
    assert cached == [0] * len(prompts)
    llm = LLM(str(model_dir), dtype="float32", **options)
    cold, _ = _run(llm, prompts)
    warm, cached = _run(llm, prompts)
    assert cold == reference and warm == reference
    assert all(c >= 32 for c in cached[:4]) and cached[4] == 31  # hits skip the prefill
    if options:
        assert llm.engine.scheduler.num_preemptions > 0


def test_n_greater_than_one_with_a_cached_prompt(model_dir):
    prompts = _prompts()[:2]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=9, n=3)
    reference, _ = _run(LLM(str(model_dir), dtype="float32", enable_prefix_caching=False),
                        prompts, params)
    llm = LLM(str(model_dir), dtype="float32")
    _run(llm, prompts, params)
    warm, cached = _run(llm, prompts, params)
    assert warm == reference and min(cached) > 0
