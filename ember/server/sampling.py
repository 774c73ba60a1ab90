"""Turns an OpenAI request's fields into the engine's SamplingParams, checking the context length.

Knows the API's defaults and names (max_completion_tokens, response_format); no HTTP here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ember.engine.sampling_params import SamplingParams
from ember.server.errors import APIError
from ember.server.protocol import ResponseFormat, SamplingFields

_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


def structured_output_for(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """`response_format` as the engine's structured_output spec (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    assert fmt.json_schema is not None
    return {"json": fmt.json_schema.schema_ or {"type": "object"}}


def resolve_max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int,
                       max_model_len: int, prompt_field: str) -> int:
    """The completion budget: what was asked (or the default), checked against the context."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, "
                            f"but the {prompt_field} take {num_prompt_tokens} tokens, leaving no "
                            "room for a completion", param=prompt_field,
                       code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; "
                            f"you requested {num_prompt_tokens + requested} tokens "
                            f"({num_prompt_tokens} in the {prompt_field}, {requested} for the "
                            "completion); reduce the prompt or max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def build_sampling_params(req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                          prompt_logprobs: int | None = None,
                          structured_output: dict[str, Any] | None = None) -> SamplingParams:
    values: dict[str, Any] = {
        "n": req.n, "max_tokens": max_tokens, "min_tokens": min(req.min_tokens, max_tokens),
        "stop": req.stop or [], "stop_token_ids": req.stop_token_ids or [],
        "seed": req.seed, "ignore_eos": req.ignore_eos, "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs, "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    if structured_output is not None:
        values["structured_output"] = structured_output
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens "
                            f"({max_tokens})", param="min_tokens")
    try:
        return SamplingParams(**values)
    except ValueError as err:
        first = str(err).split(" ", 1)[0]
        raise APIError(400, str(err), param=first if first in _PARAM_NAMES else None) from err
