"""Structured output end to end through the offline LLM and the async client: outputs parse and
validate, unconstrained neighbours are unaffected, n > 1, seeds, preemption, refusals, limits."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
import weakref

import jsonschema
import pytest

from ember import LLM, SamplingParams
from ember.config import EngineConfig
from ember.engine.messages import EngineCoreRequest
from ember.structured.tool_calls import parse_tool_calls, tool_call_spec
from tests.factories import tiny_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "color", "tags", "address"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -9, "maximum": 99},
                                         "b": {"type": "integer", "minimum": -9, "maximum": 99}},
        "required": ["a", "b"]}}},
]
PROMPTS = ["hello world", "the cache block", "a", "stream server router engine", "42 is"]
# NOTE: one torch thread: the CI box has two cores and other tests run beside these.
OPTIONS = {"dtype": "float32", "num_threads": 1}


def _json(schema=SCHEMA, **params) -> SamplingParams:
    return SamplingParams(max_tokens=150, temperature=0.0, **params,
                          structured_output={"json": schema})


def _check_json(output, schema=SCHEMA) -> dict:
    assert output.finish_reason == "stop", output.text
    value = json.loads(output.text)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models"), seed=5)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), **OPTIONS)


def test_json_schema_output_parses_and_validates(llm):
    for temperature in (0.0, 1.0):
        params = _json().clone(temperature=temperature, seed=1)
        results = llm.generate(PROMPTS, params)
        for result in results:
            _check_json(result.outputs[0])
            assert result.outputs[0].token_ids[-1] in llm.engine.model_info.eos_token_ids


def test_json_object_regex_and_ebnf(llm):
    obj = llm.generate(PROMPTS[:2], SamplingParams(
        max_tokens=150, temperature=0.0, structured_output={"json_object": True}))
    for result in obj:
        if result.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(result.outputs[0].text), dict)
        else:  # an object may legitimately run past max_tokens (unbounded keys)
            assert result.outputs[0].text.startswith("{")
    email = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9] [0-9]? "%"'
    for spec, pattern in (({"regex": email}, email), ({"grammar": grammar},
                                                      r"yes|no|maybe [0-9][0-9]?%")):
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured_output=spec)
        for result in llm.generate(PROMPTS, params):
            out = result.outputs[0]
            assert out.finish_reason == "stop" and __import__("re").fullmatch(pattern, out.text)


def test_mixed_batch_leaves_unstructured_outputs_unchanged(llm):
    free = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, free)]
    mixed = llm.generate(PROMPTS + PROMPTS, [free] * len(PROMPTS) + [_json()] * len(PROMPTS))
    assert [r.outputs[0].token_ids for r in mixed[: len(PROMPTS)]] == alone
    for result in mixed[len(PROMPTS):]:
        _check_json(result.outputs[0])


def test_n_sequences_and_seeds_each_follow_the_grammar(llm):
    params = _json(n=4, seed=7).clone(temperature=1.0)
    result = llm.generate("hello world", params)[0]
    values = [_check_json(out) for out in result.outputs]
    assert len({json.dumps(v) for v in values}) > 1  # distinct streams, each valid
    again = llm.generate("hello world", params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in result.outputs]


def test_preemption_keeps_matchers_consistent(model_dir, llm):
    prompts = [" ".join(["cache block"] * (6 + i)) for i in range(8)]
    params = _json().clone(temperature=1.0, seed=11)
    expected = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * block * kv_heads * head_dim * fp32
    small = LLM(str(model_dir), kv_cache_memory=10 * per_block, **OPTIONS)
    results = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [r.outputs[0].token_ids for r in results] == expected
    for result in results:
        _check_json(result.outputs[0])


def test_invalid_schema_is_refused_and_the_engine_serves_on(llm):
    with pytest.raises(ValueError, match=r"structured_output\['json'\] is not a valid JSON "
                                         r"schema: Unsupported type \"banana\""):
        llm.generate(PROMPTS[:2], [_json(), _json({"type": "banana"})])
    assert not llm.engine.has_unfinished
    _check_json(llm.generate("hello", _json())[0].outputs[0])
    with pytest.raises(ValueError, match="is not a valid EBNF grammar"):
        llm.generate("hello", SamplingParams(structured_output={"grammar": "root ::= x"}))


def test_max_tokens_mid_json_ends_with_length(llm):
    out = llm.generate("hello world", _json().clone(max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text.startswith('{"name"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_logprobs_are_of_the_masked_distribution(llm):
    out = llm.generate("hello", _json(logprobs=3))[0].outputs[0]
    _check_json(out)
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert position[token_id].logprob > float("-inf")  # sampled tokens are allowed ones


def test_finished_and_aborted_sequences_drop_their_matchers(llm):
    engine = llm.engine
    engine.add_request(EngineCoreRequest("leak", [5, 6, 7], _json(n=2).clone(temperature=1.0),
                                         time.monotonic()))
    request = engine.scheduler.requests["leak"]
    for _ in range(3):
        engine.step()
    matchers = [weakref.ref(seq.constraint_state) for seq in request.sequences]
    assert all(ref() is not None for ref in matchers)
    engine.abort_requests(["leak"])
    del request
    gc.collect()
    assert all(ref() is None for ref in matchers)

    engine.add_request(EngineCoreRequest("done", [5, 6, 7], _json(), time.monotonic()))
    request = engine.scheduler.requests["done"]
    engine.step()
    matcher = weakref.ref(request.leader.constraint_state)
    del request
    while engine.has_unfinished:
        engine.step()
    gc.collect()
    assert matcher() is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_parse_into_valid_calls(llm, choice):
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=2,
                            structured_output=tool_call_spec(TOOLS, choice))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for result in llm.generate(PROMPTS, params):
        out = result.outputs[0]
        content, calls = parse_tool_calls(out.text)
        assert calls, out.text
        if out.finish_reason == "stop":
            assert content == ""
        else:  # a random model may call again and again until max_tokens
            assert out.finish_reason == "length" and content.startswith("<tool_call>")
        if choice != "required":
            assert [name for name, _ in calls] == ["add"]
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), schemas[name])


def test_unstructured_serving_never_imports_xgrammar(model_dir):
    code = ("import sys; from ember import LLM, SamplingParams; "
            f"llm = LLM({str(model_dir)!r}, dtype='float32', num_threads=1); "
            "llm.generate('hello', SamplingParams(max_tokens=3)); "
            "assert 'xgrammar' not in sys.modules, 'xgrammar was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_async_client_round_trip_and_refusal(model_dir):
    from ember.engine.async_client import AsyncEngineClient

    async def collect(client, prompt, params):
        final = None
        async for out in client.generate(prompt, params):
            final = out
        return final

    async def refused(client):
        with pytest.raises(ValueError, match=r"'json'\] is not a valid JSON schema"):
            await collect(client, "hello", _json({"type": "object", "required": 5}))

    async def body():
        config = EngineConfig.from_options(str(model_dir), max_model_len=256, num_threads=1,
                                           kv_cache_memory=2 << 20)
        client = await AsyncEngineClient.start(config)
        try:
            free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            structured, _, normal = await asyncio.gather(
                collect(client, "hello world", _json()), refused(client),
                collect(client, "the cache block", free))
            return structured, normal
        finally:
            await client.shutdown()

    structured, normal = asyncio.run(asyncio.wait_for(body(), 120))
    _check_json(structured.outputs[0])
    assert normal.outputs[0].finish_reason == "length" and len(normal.outputs[0].token_ids) == 12
