"""The `SamplingParams.structured_output` dict: its shape, validated without xgrammar, and its
normal form (`GrammarSpec`), which is also the compiled-grammar cache key.

Checks shape only; whether a schema or grammar compiles is grammar.py's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Exactly one of these keys, plus the optional OPTION_KEYS.
KINDS = ("json", "json_object", "regex", "grammar", "structural_tag")
OPTION_KEYS = ("any_whitespace",)


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint in normal form; equal specs compile to the same grammar."""

    kind: str  # one of KINDS
    source: str  # JSON text (json, structural_tag), a regex, an EBNF grammar, or "" (json_object)
    any_whitespace: bool = False  # False: one-line JSON, so no run of whitespace is unbounded


def parse_spec(value: Any) -> GrammarSpec:
    """Validate a structured_output dict and return its normal form.

    Raises ValueError naming `structured_output` and the offending key.
    """
    if not isinstance(value, dict):
        raise ValueError(f"structured_output must be a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - set(KINDS) - set(OPTION_KEYS), key=str)
    if unknown:
        raise ValueError(f"structured_output has unknown key(s) {unknown}; "
                         f"expected one of {list(KINDS)} plus optional {list(OPTION_KEYS)}")
    kinds = [k for k in KINDS if k in value]
    if len(kinds) != 1:
        raise ValueError(f"structured_output must have exactly one of {list(KINDS)}, "
                         f"got {kinds or 'none'}")
    kind = kinds[0]
    any_whitespace = value.get("any_whitespace", False)
    if not isinstance(any_whitespace, bool):
        raise ValueError(f"structured_output['any_whitespace'] must be a bool, "
                         f"got {any_whitespace!r}")
    return GrammarSpec(kind, _source(kind, value[kind]), any_whitespace)


def _source(kind: str, raw: Any) -> str:
    if kind == "json_object":
        if raw is not True:
            raise ValueError(f"structured_output['json_object'] must be True, got {raw!r}")
        return ""
    if kind in ("json", "structural_tag"):
        return _json_text(kind, raw)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"structured_output[{kind!r}] must be a non-empty string, got {raw!r}")
    return raw


def _json_text(kind: str, raw: Any) -> str:
    """A dict, or a JSON string holding one, as JSON text (key order kept: it is meaningful)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_output[{kind!r}] is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"structured_output[{kind!r}] must be a JSON object (a dict or its JSON "
                         f"text), got {type(raw).__name__}")
    try:
        return json.dumps(raw, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"structured_output[{kind!r}] is not JSON-serialisable: {exc}") from exc
