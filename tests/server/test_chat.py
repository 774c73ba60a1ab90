"""/v1/chat/completions through the official openai client against a real server process."""

from __future__ import annotations

from tests.server.conftest import MODEL_NAME

MESSAGES = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": "hello world"}]


def _chat(client, **kwargs):
    extra = {k: kwargs.pop(k) for k in ("ignore_eos",) if k in kwargs}  # vLLM's extensions
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL_NAME, extra_body=extra or None, **kwargs)


def test_chat_applies_the_template_and_counts_usage(client, tokenizer):
    resp = _chat(client, max_tokens=10, temperature=0, ignore_eos=True)
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                             tokenize=False)
    assert resp.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    assert resp.usage.completion_tokens == 10
    completion = client.completions.create(model=MODEL_NAME, prompt=expected, max_tokens=10,
                                           temperature=0)
    assert choice.message.content == completion.choices[0].text  # the same prompt tokens


def test_max_completion_tokens_is_honoured(client):
    resp = _chat(client, max_completion_tokens=3, temperature=0, ignore_eos=True)
    assert resp.usage.completion_tokens == 3


def test_stream_deltas_concatenate_to_the_whole_message(client):
    whole = _chat(client, max_tokens=16, temperature=0)
    chunks = list(_chat(client, max_tokens=16, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and finishes.count(None) == \
        len(finishes) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(_chat(client, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices for c in chunks)


def test_n_streams_every_choice(client):
    chunks = list(_chat(client, max_tokens=8, temperature=1.0, seed=7, n=3, stream=True))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = _chat(client, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_logprobs_are_the_greedy_best(client):
    resp = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4,
                 ignore_eos=True)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy picked the best
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert "".join(e.token for e in content) == resp.choices[0].message.content


def test_stop_and_multi_turn_with_tool_messages(client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": [{"type": "text", "text": "and then?"}]},
    ]
    resp = _chat(client, messages=messages, max_tokens=8, temperature=0, stop=["\n"])
    assert "\n" not in resp.choices[0].message.content
