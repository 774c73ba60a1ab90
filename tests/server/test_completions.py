"""/v1/completions through the official openai client against a real server process."""

from __future__ import annotations

import pytest

from tests.server.conftest import MODEL_NAME

PROMPT = "the cache block"


def _complete(client, **kwargs):
    extra = {k: kwargs.pop(k) for k in ("ignore_eos",) if k in kwargs}  # vLLM's extensions
    return client.completions.create(model=MODEL_NAME, extra_body=extra or None, **kwargs)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_greedy_completion_and_usage(client, tokenizer):
    resp = _complete(client, prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    (choice,) = resp.choices
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    again = _complete(client, prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    assert again.choices[0].text == choice.text


def test_stream_concatenates_to_the_whole_response(client):
    whole = _complete(client, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(_complete(client, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason


def test_token_id_prompts_and_several_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    by_text = _complete(client, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = _complete(client, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = _complete(client, prompt=[PROMPT, "hello world"], max_tokens=8, temperature=0, n=2)
    assert sorted(c.index for c in both.choices) == [0, 1, 2, 3]
    first = [c for c in both.choices if c.index in (0, 1)]
    assert all(c.text == by_text.choices[0].text for c in first)  # greedy: n copies agree


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = dict(prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=1234)
    a = _complete(client, **kwargs)
    b = _complete(client, **kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # distinct streams per choice
    other = _complete(client, **{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_string_ends_the_text_before_it(client):
    text = _complete(client, prompt=PROMPT, max_tokens=24, temperature=0,
                     ignore_eos=True).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    resp = _complete(client, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]


def test_logprobs_and_echo(client, tokenizer):
    resp = _complete(client, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                     ignore_eos=True)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        if "\ufffd" not in "".join(top):  # keys are token texts: partial UTF-8 ones collide
            assert top[token] == pytest.approx(chosen) == max(top.values())  # greedy: the best
    assert "".join(lp.tokens) == resp.choices[0].text
    echoed = _complete(client, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                       logprobs=1, ignore_eos=True)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + resp.choices[0].text
    num_prompt = len(tokenizer.encode(PROMPT))
    assert len(choice.logprobs.tokens) == num_prompt + 6
    assert choice.logprobs.token_logprobs[0] is None
    assert all(x is not None for x in choice.logprobs.token_logprobs[1:])


@pytest.mark.parametrize("stream", [False, True])
def test_async_client_concurrent_requests(async_client, stream):
    import asyncio

    async def one(i):
        if stream:
            chunks = await async_client.completions.create(
                model=MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0,
                stream=True)
            return "".join([c.choices[0].text async for c in chunks if c.choices])
        resp = await async_client.completions.create(
            model=MODEL_NAME, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0)
        return resp.choices[0].text

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
