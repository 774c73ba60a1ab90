"""kv_cache_dtype="fp8": the engine against transformers' own model with its K/V rounded the
same way (PyTorch's fp8 cast after a clamp, via a registered attention function), the
capacity it buys, and the bad values it refuses."""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.model.demo import build_random_model

NUM_NEW = 32
# what each name means, written out here rather than taken from the code under test
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
       "fp8_e5m2": torch.float8_e5m2}
CASES = {  # case -> (architecture, config overrides, kv_cache_dtype): GQA, q/k norm, windows
    "llama-e4m3": ("LlamaForCausalLM", {}, "fp8"),
    "qwen3-e5m2": ("Qwen3ForCausalLM", {"head_dim": 32}, "fp8_e5m2"),
    "mistral-window-e4m3": ("MistralForCausalLM", {"sliding_window": 24}, "fp8_e4m3"),
}


def _rounded_kv_reference(model_dir, cache_dtype: torch.dtype):
    """transformers' model whose attention sees every key and value rounded through fp8."""
    import transformers
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def attention(module, query, key, value, attention_mask, **kwargs):
        def rounded(x):  # PyTorch's own cast, after a clamp to the format's range
            limit = torch.finfo(cache_dtype).max
            return x.clamp(-limit, limit).to(cache_dtype).to(x.dtype)

        return sdpa_attention_forward(module, query, rounded(key), rounded(value),
                                      attention_mask, **kwargs)

    name = f"ember_test_{cache_dtype}".replace(".", "_")
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)  # else no sliding-window mask is made
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=name)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_kv_matches_transformers_with_rounded_kv(case, tmp_path):
    architecture, overrides, kv_cache_dtype = CASES[case]
    model_dir = build_random_model(tmp_path / case, architecture, seed=5, **overrides)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(5, 1024, (n,), generator=gen).tolist() for n in (3, 20, 45)]
    llm = LLM(str(model_dir), dtype="float32", kv_cache_dtype=kv_cache_dtype,
              max_num_batched_tokens=32)  # the 45-token prompt prefills in two chunks
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reference = _rounded_kv_reference(model_dir, FP8[kv_cache_dtype])
    for prompt, result in zip(prompts, results):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        expected = out.sequences[0, len(prompt):].tolist()
        got = result.outputs[0]
        assert got.token_ids == expected, f"prompt of {len(prompt)} tokens"
        expected_logprobs = [torch.log_softmax(step[0], -1)[t].item()
                             for step, t in zip(out.logits, expected)]
        got_logprobs = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(expected_logprobs),
                                   atol=1e-3, rtol=0)


def test_fp8_cache_holds_twice_the_tokens_and_serves_forks(tmp_path):
    model_dir = build_random_model(tmp_path / "m", "LlamaForCausalLM", seed=1)
    budget = 8 << 20
    auto = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=budget)
    fp8 = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=budget, kv_cache_dtype="fp8")
    assert fp8.engine.runtime.num_blocks == 2 * auto.engine.runtime.num_blocks
    assert fp8.engine.runner.kv_pool.dtype == torch.float8_e4m3fn
    # n > 1 copies the prompt's last partial block on write; seeded samples stay reproducible
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, n=3, ignore_eos=True)
    first = fp8.generate([{"prompt_token_ids": list(range(10, 31))}], params)[0]
    again = fp8.generate([{"prompt_token_ids": list(range(10, 31))}], params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert fp8.engine.scheduler.kv.pool.num_free_blocks == fp8.engine.runtime.num_blocks


def test_fp8_and_auto_caches_never_share_prefix_hashes(tmp_path):
    model_dir = build_random_model(tmp_path / "m", "LlamaForCausalLM", seed=1)
    roots = {kind: LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=4 << 20,
                       kv_cache_dtype=kind).engine.scheduler.kv.cache_root
             for kind in ("auto", "fp8", "fp8_e5m2")}
    assert len(set(roots.values())) == 3


@pytest.mark.parametrize("value", ["fp16", "int8", "FP8"])
def test_unknown_kv_cache_dtype_is_refused_by_name(value, tmp_path):
    model_dir = build_random_model(tmp_path / "m", "LlamaForCausalLM", seed=1)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(model_dir), kv_cache_dtype=value)
