"""Prompt inputs the APIs accept, and turning one into (text, token ids).

Shared by the offline LLM and the async client so both read prompts the same way.
"""

from __future__ import annotations

from typing import Any

PromptType = str | list[int] | dict[str, Any]


def tokenize_prompt(tokenizer: Any, prompt: PromptType) -> tuple[str | None, list[int]]:
    """(text, token ids): a string is encoded; token ids are taken as given."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, list):
        return None, list(prompt)
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise ValueError(f"unknown prompt field(s) {sorted(unknown)}")
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
    raise ValueError("a prompt is a string, a list of token ids, or a dict with 'prompt' or "
                     "'prompt_token_ids'")


def check_token_ids(token_ids: list[int], vocab_size: int,
                    name: str = "prompt_token_ids") -> None:
    """ValueError naming the ids a prompt (or `name`) holds outside the model's vocabulary."""
    bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"{name} contains ids outside the vocabulary "
                         f"[0, {vocab_size}): {bad[:5]}")
