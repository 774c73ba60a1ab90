"""The structured_output dict's shape checks and normal form, and SamplingParams' use of them."""

from __future__ import annotations

import pytest

from ember.engine.sampling_params import SamplingParams
from ember.structured.spec import GrammarSpec, parse_spec


def test_each_kind_normalises_to_a_hashable_spec():
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    as_dict = parse_spec({"json": schema})
    as_text = parse_spec({"json": '{"type": "object", "properties": {"b": {"type": "string"}, '
                                  '"a": {"type": "integer"}}}'})
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert as_dict.source.index('"b"') < as_dict.source.index('"a"')  # property order is kept
    assert parse_spec({"json_object": True}) == GrammarSpec("json_object", "", False)
    assert parse_spec({"regex": "[a-z]+", "any_whitespace": True}) == GrammarSpec(
        "regex", "[a-z]+", True)
    assert parse_spec({"grammar": 'root ::= "x"'}).kind == "grammar"
    assert parse_spec({"structural_tag": {"type": "structural_tag"}}).kind == "structural_tag"


@pytest.mark.parametrize(("value", "message"), [
    ("json", "must be a dict"),
    ({}, "exactly one of"),
    ({"json": {}, "regex": "a"}, "exactly one of"),
    ({"json_schema": {}}, "unknown key.*json_schema"),
    ({"json": "{not json"}, r"structured_output\['json'\] is not valid JSON"),
    ({"json": [1, 2]}, r"structured_output\['json'\] must be a JSON object"),
    ({"json_object": "yes"}, r"structured_output\['json_object'\] must be True"),
    ({"regex": ""}, r"structured_output\['regex'\] must be a non-empty string"),
    ({"grammar": 3}, r"structured_output\['grammar'\] must be a non-empty string"),
    ({"json_object": True, "any_whitespace": "no"}, "any_whitespace.*must be a bool"),
])
def test_bad_shapes_are_refused_naming_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(value)
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_output=value)


def test_sampling_params_keeps_the_dict_and_refuses_min_tokens():
    spec = {"json": {"type": "object"}, "any_whitespace": False}
    assert SamplingParams(structured_output=spec).structured_output == spec
    assert SamplingParams().structured_output is None
    with pytest.raises(ValueError, match="min_tokens must be 0 with structured_output"):
        SamplingParams(structured_output=spec, min_tokens=2)
