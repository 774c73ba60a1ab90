"""The offline LLM API end to end: batch invariance, chunked prefill, preemption, seeds,
n > 1, stop conditions, logprobs and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ember import LLM, SamplingParams
from ember.model.demo import build_random_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM", seed=11)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32")


def _prompts(num: int, seed: int, low: int = 3, high: int = 60) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high, (num,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(5, 1000, (n,), generator=gen).tolist()}
            for n in lens]


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


def test_batch_invariance_alone_batched_chunked_and_preempted(model_dir, llm):
    target = _prompts(1, seed=1, low=40, high=41)[0]
    others = _prompts(30, seed=2)
    alone = _tokens(llm.generate([target], GREEDY))[0]
    batched = _tokens(llm.generate([target] + others, GREEDY))[0]
    assert batched == alone

    chunked = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=16)
    assert _tokens(chunked.generate([target] + others, GREEDY))[0] == alone

    # A cache of 12 blocks x 16 tokens cannot hold 31 sequences: preemption must happen.
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * block * kv_heads * head_dim * fp32
    small = LLM(str(model_dir), dtype="float32", kv_cache_memory=12 * per_block)
    results = small.generate(others[:10] + [target], GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert _tokens(results)[-1] == alone
    assert _tokens(results)[:10] == _tokens(llm.generate(others[:10], GREEDY))
    assert small.engine.scheduler.kv.pool.num_free_blocks == small.engine.runtime.num_blocks


def test_seeded_sampling_is_reproducible_across_batch_compositions(llm):
    target = _prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    alone = llm.generate([target], params)[0].outputs[0].token_ids
    mixed = llm.generate(_prompts(5, seed=4) + [target] + _prompts(3, seed=5),
                         [unseeded] * 5 + [params] + [unseeded] * 3)
    assert mixed[5].outputs[0].token_ids == alone


def test_n_sequences_are_distinct_streams_sharing_the_prompt(llm):
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    result = llm.generate("hello world", params)[0]
    assert [o.index for o in result.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    assert all(len(o.token_ids) == 12 for o in result.outputs)
    again = llm.generate("hello world", params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in result.outputs]
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.engine.runtime.num_blocks


def test_greedy_n_matches_greedy_single(llm):
    params = SamplingParams(n=3, max_tokens=10, temperature=0.0, ignore_eos=True)
    single = llm.generate("the model", GREEDY.clone(max_tokens=10))[0].outputs[0].token_ids
    result = llm.generate("the model", params)[0]
    assert all(o.token_ids == single for o in result.outputs)


def test_stop_strings_stop_tokens_and_lengths(llm):
    base = llm.generate("hello", GREEDY)[0].outputs[0]
    # A stop string taken from the middle of the greedy text: output ends right before it.
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate("hello", GREEDY.clone(stop=[stop]))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: text.index(stop)]
        kept = llm.generate("hello", GREEDY.clone(stop=[stop], include_stop_str_in_output=True))
        assert kept[0].outputs[0].text == text[: text.index(stop) + len(stop)]
    stop_id = base.token_ids[5]
    out = llm.generate("hello", GREEDY.clone(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    out = llm.generate("hello", GREEDY.clone(max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_eos_and_min_tokens(llm, model_dir):
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    base = llm.generate("hello", GREEDY)[0].outputs[0]
    # Make the 4th greedy token the EOS by calling it a stop token id: min_tokens suppresses it.
    fourth = base.token_ids[3]
    out = llm.generate("hello", GREEDY.clone(stop_token_ids=[fourth], min_tokens=8,
                                             max_tokens=12))[0].outputs[0]
    assert fourth not in out.token_ids[:8]
    assert len(out.token_ids) >= 8
    assert eos is not None


def test_logprobs_and_prompt_logprobs_are_consistent(llm):
    prompt = _prompts(1, seed=9, low=12, high=13)[0]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    result = llm.generate([prompt], params)[0]
    out = result.outputs[0]
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert position[token_id].rank == 1  # greedy picks the most likely token
        assert len(position) == 3
        best = max(lp.logprob for lp in position.values())
        assert position[token_id].logprob == pytest.approx(best)
    assert out.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs)))
    ids = prompt["prompt_token_ids"]
    assert result.prompt_logprobs[0] is None
    assert len(result.prompt_logprobs) == len(ids)
    for token_id, position in zip(ids[1:], result.prompt_logprobs[1:]):
        assert token_id in position and position[token_id].logprob <= 0.0
    # Prompt logprobs agree whether the prompt is prefilled whole or in chunks.
    chunked = LLM(llm.config.model.model, dtype="float32", max_num_batched_tokens=5)
    again = chunked.generate([prompt], params)[0]
    for a, b in zip(result.prompt_logprobs[1:], again.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].logprob == pytest.approx(b[key].logprob, abs=1e-4)


def test_generate_takes_one_params_per_prompt(llm):
    results = llm.generate(["a", "b"], [GREEDY.clone(max_tokens=2), GREEDY.clone(max_tokens=5)])
    assert [len(r.outputs[0].token_ids) for r in results] == [2, 5]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY])


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("n", 0),
    ("min_p", 2.0), ("repetition_penalty", 0.0), ("top_k", -2),
])
def test_bad_sampling_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_sampling_field_is_named():
    with pytest.raises(ValueError, match="best_of_typo"):
        SamplingParams(best_of_typo=2)


def test_prompt_longer_than_context_is_refused_and_engine_keeps_serving(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": list(range(5, 45))}], GREEDY)
    ok = llm.generate("hi", GREEDY.clone(max_tokens=4))[0].outputs[0]
    assert len(ok.token_ids) == 4
    assert llm.engine.scheduler.kv.pool.num_free_blocks == llm.engine.runtime.num_blocks


def test_generation_stops_at_the_context_length(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=20)
    out = llm.generate([{"prompt_token_ids": list(range(5, 15))}],
                       SamplingParams(max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_bad_engine_option_and_token_ids_are_named(model_dir, llm):
    with pytest.raises(ValueError, match="max_num_seq_typo"):
        LLM(str(model_dir), max_num_seq_typo=3)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([{"prompt_token_ids": [1, 2, 10**6]}], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([{"prompt_ids": [1, 2]}], GREEDY)


def test_engine_seed_makes_unseeded_sampling_repeatable(model_dir):
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    runs = [LLM(str(model_dir), dtype="float32", seed=s).generate("hello", params)[0]
            for s in (5, 5, 6)]
    assert runs[0].outputs[0].token_ids == runs[1].outputs[0].token_ids
    assert runs[0].outputs[0].token_ids != runs[2].outputs[0].token_ids


def test_chat_applies_the_models_chat_template(llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = llm.get_tokenizer().apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True)
    assert expected.endswith("<|im_start|>assistant\n")
    chat = llm.chat(messages, GREEDY.clone(max_tokens=6))[0]
    plain = llm.generate(expected, GREEDY.clone(max_tokens=6))[0]
    assert chat.prompt == expected
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
