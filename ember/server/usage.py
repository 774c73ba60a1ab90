"""The `usage` object: token counts of a response, summed over its prompts and choices."""

from __future__ import annotations

from typing import Any

from ember.engine.outputs import RequestOutput


def usage_of(outs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(s.token_ids) for o in outs for s in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


CACHED_TOKENS_HEADER = "x-ember-cached-tokens"  # read by `ember router` (predicted vs actual)


def cached_tokens_header(outs: list[RequestOutput | None]) -> dict[str, str]:
    """Known from the first output on, so a stream can carry it in its headers."""
    return {CACHED_TOKENS_HEADER: str(sum(o.num_cached_tokens for o in outs if o is not None))}
