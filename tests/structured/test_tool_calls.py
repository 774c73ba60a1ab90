"""tool_call_spec's structural tags (compiled against a real vocabulary) and parse_tool_calls."""

from __future__ import annotations

import json

import pytest

from ember.structured.spec import parse_spec
from ember.structured.tool_calls import parse_tool_calls, tool_call_spec

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


def _call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def _matches(grammar, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.fixture(scope="module")
def compile_spec(tmp_path_factory):
    from ember.model.demo import build_random_model
    from ember.structured.grammar import GrammarCache

    model_dir = build_random_model(tmp_path_factory.mktemp("tools"), "LlamaForCausalLM")
    cache = GrammarCache(model_dir, 1024, [4])
    return lambda spec: cache.get(parse_spec(spec))


def test_none_and_auto_without_tools_are_unconstrained():
    assert tool_call_spec([WEATHER], "none") is None
    assert tool_call_spec([], "auto") is None


def test_auto_allows_text_and_valid_calls_only(compile_spec):
    grammar = compile_spec(tool_call_spec([WEATHER, ADD], "auto"))
    assert _matches(grammar, "Just text, no call.")
    assert _matches(grammar, "Let me add. " + _call("add", {"a": 1, "b": 2}) + " done")
    assert not _matches(grammar, _call("add", {"a": "one", "b": 2}))
    assert not _matches(grammar, _call("mul", {"a": 1, "b": 2}))


def test_required_allows_one_or_more_calls_and_nothing_else(compile_spec):
    grammar = compile_spec(tool_call_spec([WEATHER, ADD], "required"))
    one = _call("get_weather", {"city": "Paris"})
    assert _matches(grammar, one)
    assert _matches(grammar, one + "\n" + _call("add", {"a": 1, "b": 2}))
    assert not _matches(grammar, "")
    assert not _matches(grammar, "Sure. " + one)
    assert not _matches(grammar, _call("get_weather", {"town": "Paris"}))


def test_named_function_allows_exactly_that_call(compile_spec):
    grammar = compile_spec(tool_call_spec([WEATHER, ADD], NAMED_ADD))
    assert _matches(grammar, _call("add", {"a": 1, "b": 2}))
    assert not _matches(grammar, _call("get_weather", {"city": "Paris"}))
    assert not _matches(grammar, _call("add", {"a": 1, "b": 2}) * 2)


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([], "required", "needs at least one tool"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not in"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([WEATHER], {"type": "function"}, "tool_choice must be"),
    ([{"type": "function", "function": {"description": "x"}}], "auto",
     r"tools\[0\].function.name"),
    ([{"type": "retrieval"}], "auto", r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "auto",
     r"tools\[0\].function.parameters"),
])
def test_bad_tools_or_choice_are_refused(tools, choice, message):
    with pytest.raises(ValueError, match=message):
        tool_call_spec(tools, choice)


def test_parse_no_calls_keeps_the_text():
    assert parse_tool_calls("  just an answer \n") == ("just an answer", [])
    assert parse_tool_calls("") == ("", [])


def test_parse_several_calls_with_text_around_them():
    text = ("Checking. " + _call("get_weather", {"city": "Oslo"}) + "\n"
            + _call("add", {"a": 1, "b": 2}) + "\nDone.")
    content, calls = parse_tool_calls(text)
    assert content == "Checking. \n\nDone."
    assert [name for name, _ in calls] == ["get_weather", "add"]
    assert [json.loads(args) for _, args in calls] == [{"city": "Oslo"}, {"a": 1, "b": 2}]


def test_parse_leaves_malformed_and_unclosed_blocks_as_content():
    bad_json = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1,}\n</tool_call>"
    no_name = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    args_not_object = '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>'
    unclosed = '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    good = _call("add", {"a": 1, "b": 2})
    for junk in (bad_json, no_name, args_not_object, unclosed):
        content, calls = parse_tool_calls(good + junk)
        assert content == junk.strip() and [name for name, _ in calls] == ["add"]
        content, calls = parse_tool_calls(junk + good)
        assert content == junk.strip() and [name for name, _ in calls] == ["add"]
