"""OpenAI tool calling in the model's Hermes-style format: the structured_output spec that makes
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks valid, and their parser.

Plain dicts and strings only (no xgrammar import): the server builds specs and parses text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ember.model.demo_tokenizer import TOOL_CALL_END, TOOL_CALL_START

# A call's text up to its arguments object, and from the end of that object on: the format the
# demo chat template renders (xgrammar's "qwen_3" builtin tag uses the same one).
_BEGIN = TOOL_CALL_START + '\n{"name": '
_ARGUMENTS = ', "arguments": '
_END = "}\n" + TOOL_CALL_END
# A block's body never holds another opening tag: an unclosed block does not swallow the next.
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"((?:(?!" + re.escape(TOOL_CALL_START)
                    + r").)*?)" + re.escape(TOOL_CALL_END), re.DOTALL)
# Caps each whitespace run inside arguments, as one-line JSON does for response_format.
_MAX_WHITESPACE = 1


def tool_call_spec(tools: list[dict], tool_choice: str | dict) -> dict | None:
    """The structured_output dict for OpenAI `tools` and `tool_choice` (None: unconstrained).

    "none" (or no tools under "auto"): None. "auto": free text, but a `<tool_call>` must
    complete as a call to one of the tools. "required": one or more calls, one per line, and
    nothing else. {"type": "function", "function": {"name": N}}: exactly one call of N.
    Raises ValueError naming the bad field.
    """
    functions = [_function(i, tool) for i, tool in enumerate(tools or [])]
    if tool_choice == "none":
        return None
    if tool_choice == "auto":
        if not functions:
            return None
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_START],
               "tags": [_tag(name, params) for name, params in functions]}
    elif tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        fmt = {"type": "tags_with_separator", "separator": "\n", "at_least_one": True,
               "tags": [_tag(name, params) for name, params in functions]}
    elif isinstance(tool_choice, dict):
        name = _named_choice(tool_choice)
        matches = [params for fn_name, params in functions if fn_name == name]
        if not matches:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        fmt = _tag(name, matches[0])
    else:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, "
                         f"got {tool_choice!r}")
    return {"structural_tag": {"type": "structural_tag", "format": fmt}}


def _function(idx: int, tool: Any) -> tuple[str, dict | bool]:
    """(name, parameters schema) of one tool; True (any JSON object) without parameters."""
    where = f"tools[{idx}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.function.name must be a non-empty string")
    params = function.get("parameters")
    if params is None:
        return name, {"type": "object"}
    if not isinstance(params, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    return name, params


def _named_choice(choice: dict) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}}, "
                         f"got {choice!r}")
    return name


def _tag(name: str, parameters: dict | bool) -> dict:
    return {"type": "tag", "begin": _BEGIN + json.dumps(name, ensure_ascii=False) + _ARGUMENTS,
            "content": {"type": "json_schema", "json_schema": parameters,
                        "max_whitespace_cnt": _MAX_WHITESPACE},
            "end": _END}


def parse_tool_calls(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split model output into (content, [(name, arguments as JSON text), ...]).

    Each well-formed `<tool_call>` block (a JSON object with a string "name" and an object
    "arguments") becomes a call, in order; anything else, malformed or unclosed blocks
    included, stays in content, which is stripped ("" when nothing else was said).
    """
    calls: list[tuple[str, str]] = []
    pieces: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        pieces.append(text[pos:match.start()])
        calls.append(call)
        pos = match.end()
    pieces.append(text[pos:])
    return "".join(pieces).strip(), calls


def _parse_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)
