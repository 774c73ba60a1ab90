"""The whole engine (LLM.generate) against transformers' own generate, for every architecture.

fp32 tiny random models: greedy tokens equal for 32+ new tokens on prompts of several
lengths, and the chosen tokens' logprobs match transformers' within 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.model.demo import build_random_model

NUM_NEW = 32
PROMPT_LENS = [1, 5, 17, 40]

ARCH_CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3-rope": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-linear-rope-tied-mqa": ("LlamaForCausalLM", {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True,
        "num_kv_heads": 1}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 24}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 24}),
    "mixtral": ("MixtralForCausalLM", {}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"decoder_sparse_step": 1, "mlp_only_layers": [1]}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", {}),
}


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(5, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _load_transformers(model_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # like ignore_eos: exactly NUM_NEW tokens
    return model


def _transformers_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_greedy_tokens_and_logprobs_match_transformers(case, tmp_path):
    architecture, overrides = ARCH_CASES[case]
    overrides = dict(overrides)
    kwargs = {k: overrides.pop(k) for k in ("num_kv_heads",) if k in overrides}
    model_dir = build_random_model(tmp_path / case, architecture, seed=3, **kwargs, **overrides)
    prompts = _prompts(1024)
    llm = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    reference = _load_transformers(model_dir)
    for prompt, result in zip(prompts, results):
        expected_tokens, expected_logprobs = _transformers_greedy(reference, prompt)
        got = result.outputs[0]
        assert got.token_ids == expected_tokens, f"prompt of {len(prompt)} tokens"
        got_logprobs = [got.logprobs[i][t].logprob for i, t in enumerate(got.token_ids)]
        torch.testing.assert_close(torch.tensor(got_logprobs), torch.tensor(expected_logprobs),
                                   atol=1e-3, rtol=0)
        assert got.finish_reason == "length"
