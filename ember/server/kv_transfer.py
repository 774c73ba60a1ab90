"""Disaggregated serving over HTTP (see docs/disaggregation.md): a decode worker reserves
blocks for a request's prompt (`POST /kv_transfer/reserve`), a prefill worker computes the
prompt and writes its KV there (a request whose `kv_transfer_params` say `do_remote_decode`),
and the decode worker continues the request (`kv_transfer_params` naming the reservation).

The field shapes follow vLLM's `kv_transfer_params` where they carry the same meaning.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel

from ember.server.errors import APIError
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.state import ServerState

_SENDER_KEYS = {"do_remote_decode", "peer", "block_ids", "first_block"}  # + expires_at_unix
_RECEIVER_KEYS = {"transfer_id", "first_token_ids"}


class ReserveRequest(BaseModel):
    endpoint: Literal["chat", "completions"]
    request: dict[str, Any]  # the OpenAI request body the decode worker will serve
    transfer_id: str | None = None


async def reserve(body: ReserveRequest, state: ServerState) -> dict[str, Any]:
    """Blocks for the request's prompt, as this worker would tokenize it; 503 (code no_room)
    when it has no room now."""
    from ember.engine.remote_prefill import NoRoomError
    from ember.server.chat import render_chat_prompt
    from ember.server.completions import completion_prompts

    state.check_serving()
    try:
        if body.endpoint == "chat":
            _, ids = render_chat_prompt(ChatCompletionRequest(**body.request), state.tokenizer)
        else:
            prompts = completion_prompts(CompletionRequest(**body.request), state.tokenizer)
            if len(prompts) != 1:
                raise APIError(400, "a remote prefill serves exactly one prompt",
                               param="prompt")
            ids = prompts[0][1]
    except ValueError as err:  # pydantic's ValidationError included
        raise APIError(400, f"the request to reserve for is invalid: {err}",
                       param="request") from err
    transfer_id = body.transfer_id or f"xfer-{uuid.uuid4().hex}"
    try:
        return await state.client.reserve_kv(transfer_id, ids)
    except NoRoomError as err:
        raise APIError(503, str(err), code="no_room", headers={"Retry-After": "1"}) from err
    except ValueError as err:
        raise APIError(400, str(err), param="request") from err


def engine_kv_transfer(params: dict[str, Any] | None, *, stream: bool,
                       num_prompts: int = 1) -> dict[str, Any] | None:
    """The engine's `kv_transfer` for a request's `kv_transfer_params` (400 when malformed)."""
    if not params:
        return None
    if params.get("do_remote_decode"):
        missing = _SENDER_KEYS - set(params)
        if missing:
            raise APIError(400, f"kv_transfer_params lack {sorted(missing)}",
                           param="kv_transfer_params")
        if stream:
            raise APIError(400, "a remote-decode (prefill-only) request cannot stream",
                           param="stream")
    elif set(params) & _RECEIVER_KEYS != _RECEIVER_KEYS:
        raise APIError(400, f"kv_transfer_params need do_remote_decode, or "
                            f"{sorted(_RECEIVER_KEYS)}", param="kv_transfer_params")
    if num_prompts != 1:
        raise APIError(400, "kv_transfer_params serve exactly one prompt", param="prompt")
    return params


def prefill_result(kv_transfer: dict[str, Any] | None, outs: list[Any]) -> dict[str, Any]:
    """What a prefill worker's response adds: the first token of each choice."""
    if not kv_transfer or not kv_transfer.get("do_remote_decode"):
        return {}
    first = [seq.token_ids[0] for out in outs for seq in sorted(out.outputs,
                                                                key=lambda s: s.index)]
    return {"kv_transfer_params": {"first_token_ids": first}}
