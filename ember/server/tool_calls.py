"""Tool calls in chat responses: parsing the model's `<tool_call>` blocks into OpenAI
`tool_calls`, and holding streamed text back once a call may have begun.

The grammar that makes the blocks valid lives in ember.structured.tool_calls.
"""

from __future__ import annotations

import uuid
from typing import Any

from ember.model.demo_tokenizer import TOOL_CALL_START


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def to_openai_calls(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"id": _call_id(), "type": "function",
             "function": {"name": name, "arguments": arguments}} for name, arguments in calls]


class ToolCallParser:
    """Per choice: what content to stream now, and at the end the calls and any content left.

    `is_calls_only` (tool_choice required or named): every token belongs to calls, nothing is
    streamed as content. Otherwise content streams until text that may open `<tool_call>`.
    """

    def __init__(self, is_calls_only: bool, max_calls: int | None) -> None:
        self.is_calls_only = is_calls_only
        self.max_calls = max_calls
        self.text = ""
        self.num_emitted = 0
        self.is_in_call = is_calls_only

    def feed(self, delta: str) -> str:
        """Content safe to stream now."""
        self.text += delta
        if self.is_in_call:
            return ""
        start = self.text.find(TOOL_CALL_START, self.num_emitted)
        if start >= 0:
            self.is_in_call = True
            visible = start
        else:
            visible = len(self.text) - _partial_suffix(self.text, TOOL_CALL_START)
        out = self.text[self.num_emitted:visible]
        self.num_emitted = max(self.num_emitted, visible)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content not yet streamed, calls) once the choice has ended."""
        from ember.structured.tool_calls import parse_tool_calls

        content, calls = parse_tool_calls(self.text)
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        rest = content[self.num_emitted:] if content.startswith(
            self.text[: self.num_emitted]) else ""
        self.num_emitted = len(self.text)
        return rest, to_openai_calls(calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
