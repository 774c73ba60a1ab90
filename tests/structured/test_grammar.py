"""GrammarCache: compiles each kind against a real tokenizer, caches (LRU), and turns
xgrammar's errors into ValueErrors that name the problem."""

from __future__ import annotations

import pytest

from ember.structured.grammar import GrammarCache
from ember.structured.spec import parse_spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ember.model.demo import build_random_model

    return build_random_model(tmp_path_factory.mktemp("grammar"), "LlamaForCausalLM")


def test_compiles_every_kind_and_caches_least_recently_used(model_dir):
    cache = GrammarCache(model_dir, 1024, [4], max_entries=2)
    specs = [parse_spec(s) for s in (
        {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        {"json_object": True}, {"regex": "[0-9]+"}, {"grammar": 'root ::= "a" | "b"'},
        {"structural_tag": {"type": "structural_tag",
                            "format": {"type": "const_string", "value": "hi"}}})]
    grammars = [cache.get(spec) for spec in specs]
    assert len(cache) == 2 and all(g is not None for g in grammars)
    assert cache.get(specs[-1]) is grammars[-1]  # a hit
    cache.get(specs[-2])  # touch: specs[-1] is now the least recently used
    cache.get(specs[0])
    assert cache.get(specs[-2]) is grammars[-2]
    assert cache.get(specs[-1]) is not grammars[-1]  # evicted, compiled afresh


@pytest.mark.parametrize(("spec", "message"), [
    ({"json": {"type": "foo"}}, r"'json'\] is not a valid JSON schema: Unsupported type \"foo\""),
    ({"json": {"properties": 3}}, "properties must be an object"),
    ({"regex": "(ab"}, r"'regex'\] is not a valid regex: .*parenthesis is not closed"),
    ({"grammar": "root ::= foo"}, r"'grammar'\] is not a valid EBNF grammar: .*\"foo\" is not"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}},
     r"'structural_tag'\] is not a valid structural tag"),
])
def test_invalid_sources_raise_value_error_naming_the_problem(model_dir, spec, message):
    cache = GrammarCache(model_dir, 1024, [4])
    with pytest.raises(ValueError, match=message) as info:
        cache.get(parse_spec(spec))
    assert ".cc:" not in str(info.value)  # xgrammar's C++ source location is stripped
    assert len(cache) == 0


@pytest.mark.parametrize("string_schema", [{"type": "string"}, {"type": "string", "maxLength": 5},
                                           {"type": "string", "minLength": 1}])
def test_json_strings_never_hold_raw_control_characters(model_dir, string_schema):
    import xgrammar as xgr

    cache = GrammarCache(model_dir, 1024, [4])
    schema = {"type": "object", "properties": {"s": string_schema}, "required": ["s"]}
    for spec in ({"json": schema}, {"structural_tag": {"type": "structural_tag", "format": {
            "type": "json_schema", "json_schema": schema}}}):
        grammar = cache.get(parse_spec(spec))
        assert xgr.GrammarMatcher(grammar).accept_string('{"s": "ab')
        for char in ("\x00", "\x17", "\t", "\n"):
            assert not xgr.GrammarMatcher(grammar).accept_string('{"s": "a' + char)


def test_preload_builds_the_compiler_once_in_the_background(model_dir):
    cache = GrammarCache(model_dir, 1024, [4])
    cache.preload_in_background()
    grammar = cache.get(parse_spec({"json_object": True}))  # waits for the preload, if needed
    compiler = cache._compiler
    assert grammar is not None and compiler is not None
    cache.preload_in_background()  # a second preload builds nothing new
    cache.get(parse_spec({"regex": "[ab]+"}))
    assert cache._compiler is compiler
