"""Logprobs in the two OpenAI shapes: chat's `content` list and completions' parallel lists."""

from __future__ import annotations

from typing import Any

from ember.engine.outputs import PositionLogprobs


def _top(position: PositionLogprobs, num_top: int) -> list[tuple[int, Any]]:
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    return ranked[:num_top]


def _bytes(text: str | None) -> list[int]:
    return list((text or "").encode("utf-8", errors="replace"))


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs],
                  num_top: int) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion for these generated tokens."""
    content = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        content.append({
            "token": chosen.decoded_token or "", "logprob": chosen.logprob,
            "bytes": _bytes(chosen.decoded_token),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                              "bytes": _bytes(lp.decoded_token)}
                             for _, lp in _top(position, num_top)],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None],
                        num_top: int, text_offset: int) -> dict[str, Any]:
    """`choices[i].logprobs` of a completion; a None position (the first prompt token when
    echoing) has no logprob, as in OpenAI's API."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            tokens.append("")
            token_logprobs.append(None)
            tops.append(None)
            offsets.append(offset)
            continue
        chosen = position[token_id]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        tops.append({lp.decoded_token or "": lp.logprob for _, lp in _top(position, num_top)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}
