"""response_format (json_object, json_schema) and tools/tool_choice over HTTP with the official
client: outputs always parse and validate, tool calls have the right names and arguments."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.conftest import MODEL_NAME

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
            "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -100, "maximum": 100},
            "b": {"type": "integer", "minimum": -100, "maximum": 100}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Tell me about someone."}]


def _chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL_NAME, **kwargs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates(client, seed):
    resp = _chat(client, temperature=1.0, seed=seed, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_and_completions_endpoint(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = _chat(client, temperature=1.0, seed=5, stream=True, response_format=fmt)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    resp = client.completions.create(model=MODEL_NAME, prompt="A person:", max_tokens=200,
                                     temperature=1.0, seed=6, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(resp.choices[0].text), PERSON)


def test_json_object_output_parses(client):
    resp = _chat(client, temperature=1.0, seed=4, response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_invalid_schema_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"x": {"type": 5}}}}})
    assert "schema" in info.value.message.lower()
    assert _chat(client, max_tokens=2).choices[0].message.content is not None


def _check_calls(calls, names):
    assert calls, "expected tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2])
def test_required_tool_choice_gives_valid_calls(client, seed):
    resp = _chat(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                 max_tokens=120)
    choice = resp.choices[0]
    if choice.finish_reason != "length":  # a random model may call tools until max_tokens
        assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, {"get_weather", "add"})


def test_named_tool_choice_calls_that_function(client):
    choice = _chat(client, tools=TOOLS, temperature=1.0, seed=3,
                   tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's finish reason for a forced function
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, {"add"})


def test_streamed_tool_calls_match_the_whole_response(client):
    kwargs = dict(tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, temperature=1.0, seed=8)
    whole = _chat(client, **kwargs).choices[0].message.tool_calls
    streamed = {}
    for chunk in _chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            assert not choice.delta.content  # a forced call streams no content
            for call in choice.delta.tool_calls or []:
                streamed[call.index] = call
    assert [(c.function.name, c.function.arguments) for c in streamed.values()] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_auto_and_none_tool_choice(client):
    for choice in ("auto", "none"):
        resp = _chat(client, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=16)
        message = resp.choices[0].message
        if message.tool_calls:  # auto: whatever it calls must be valid
            assert choice == "auto"
            _check_calls(message.tool_calls, {"get_weather", "add"})
        else:
            assert message.content is not None


def test_parallel_tool_calls_false_returns_one_call(client):
    resp = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                 temperature=1.0, seed=1, max_tokens=120)
    assert len(resp.choices[0].message.tool_calls) == 1
