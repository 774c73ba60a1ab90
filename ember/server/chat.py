"""POST /v1/chat/completions: the chat template, tools and tool_choice, response_format,
logprobs and usage, streamed as `chat.completion.chunk` deltas or answered whole."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ember.engine.outputs import CompletionOutput, RequestOutput
from ember.server.errors import APIError
from ember.server.kv_transfer import engine_kv_transfer, prefill_result
from ember.server.logprobs import chat_logprobs
from ember.server.protocol import ChatCompletionRequest, NamedToolChoice
from ember.server.sampling import (
    build_sampling_params,
    resolve_max_tokens,
    structured_output_for,
)
from ember.server.state import ServerState
from ember.server.streaming import event_stream, first_outputs, merged, sse, until_disconnect
from ember.server.tool_calls import ToolCallParser
from ember.server.usage import cached_tokens_header, usage_of

logger = logging.getLogger(__name__)


def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            part.text for part in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    return messages


def render_chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> tuple[str, list[int]]:
    tools = [t.model_dump(by_alias=True) for t in req.tools] if req.tools else None
    try:
        text = tokenizer.apply_chat_template(
            _template_messages(req), tools=tools, tokenize=False,
            add_generation_prompt=req.add_generation_prompt)
    except Exception as err:  # jinja raises TemplateError and friends for bad conversations
        raise APIError(400, f"the chat template could not render these messages: {err}",
                       param="messages") from err
    return text, tokenizer.encode(text, add_special_tokens=False)


def _tool_mode(req: ChatCompletionRequest) -> tuple[bool, Any]:
    """(are tool calls parsed from the output, the tool_choice to constrain with)."""
    if not req.tools:
        return False, None
    choice = req.tool_choice or "auto"
    if choice == "none":
        return False, None
    if isinstance(choice, NamedToolChoice):
        return True, choice.model_dump()
    return True, choice


def _structured_output(req: ChatCompletionRequest, tool_choice: Any) -> dict[str, Any] | None:
    fmt = structured_output_for(req.response_format)
    if tool_choice is None:
        return fmt
    if fmt is not None:
        raise APIError(400, "response_format cannot be combined with tools unless tool_choice "
                            "is 'none'", param="response_format")
    from ember.structured.tool_calls import tool_call_spec

    tools = [t.model_dump(by_alias=True) for t in req.tools or []]
    return tool_call_spec(tools, tool_choice)


async def create_chat_completion(req: ChatCompletionRequest, request: Request,
                                 state: ServerState) -> Response:
    state.check_model(req.model)
    state.admit()
    text, ids = render_chat_prompt(req, state.tokenizer)
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = resolve_max_tokens(requested, None, len(ids), state.max_model_len, "messages")
    has_tools, tool_choice = _tool_mode(req)
    num_top = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(req, max_tokens=max_tokens, logprobs=num_top,
                                   structured_output=_structured_output(req, tool_choice))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if req.user:
        logger.info("%s is for user %r", request_id, req.user)
    kv_transfer = engine_kv_transfer(req.kv_transfer_params, stream=req.stream)
    stream = state.generate({"prompt": text, "prompt_token_ids": ids}, params, request_id,
                            kv_transfer)
    (first,) = await until_disconnect(request, first_outputs([stream]))
    view = _ChatView(req, state, request_id, has_tools, tool_choice)
    if req.stream:
        return event_stream(view.events(merged([stream], [first])), cached_tokens_header([first]))
    final = first
    async def collect() -> None:
        nonlocal final
        async for _, out in merged([stream], [first]):
            final = out
    await until_disconnect(request, collect())
    return JSONResponse({**view.response(final), **prefill_result(kv_transfer, [final])},
                        headers=cached_tokens_header([first]))


class _ChatView:
    """Shapes engine outputs as chat completions and chunks, tool calls included."""

    def __init__(self, req: ChatCompletionRequest, state: ServerState, request_id: str,
                 has_tools: bool, tool_choice: Any) -> None:
        self.req = req
        self.state = state
        self.id = request_id
        self.created = int(time.time())
        self.has_tools = has_tools
        self.is_named_choice = isinstance(tool_choice, dict)
        self.is_calls_only = tool_choice == "required" or self.is_named_choice
        self.max_calls = None if req.parallel_tool_calls else 1

    def _finish_reason(self, seq: CompletionOutput, calls: list[Any]) -> str | None:
        if calls and not self.is_named_choice and seq.finish_reason == "stop":
            return "tool_calls"
        return seq.finish_reason

    def _logprobs(self, seq: CompletionOutput, start: int, end: int) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(seq.token_ids[start:end], (seq.logprobs or [])[start:end],
                             self.req.top_logprobs or 0)

    def response(self, out: RequestOutput) -> dict[str, Any]:
        choices = []
        for seq in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": seq.text}
            calls: list[Any] = []
            if self.has_tools:
                parser = ToolCallParser(self.is_calls_only, self.max_calls)
                emitted = parser.feed(seq.text)
                rest, calls = parser.finish()
                message["content"] = (emitted + rest) or None
                if calls:
                    message["tool_calls"] = calls
            choices.append({"index": seq.index, "message": message,
                            "logprobs": self._logprobs(seq, 0, len(seq.token_ids)),
                            "finish_reason": self._finish_reason(seq, calls),
                            "stop_reason": seq.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": usage_of([out])}

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.state.model_name,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}]}
        if self.req.stream_options and self.req.stream_options.include_usage:
            chunk["usage"] = None
        return chunk

    async def events(self, outputs: AsyncIterator[tuple[int, RequestOutput]]
                     ) -> AsyncIterator[str]:
        n = self.req.n
        num_sent = [0] * n
        parsers = [ToolCallParser(self.is_calls_only, self.max_calls) if self.has_tools
                   else None for _ in range(n)]
        for i in range(n):
            yield sse(self._chunk(i, {"role": "assistant", "content": ""}))
        final: RequestOutput | None = None
        async for _, out in outputs:
            final = out
            for seq in out.outputs:
                i = seq.index
                parser = parsers[i]
                content = seq.delta_text if parser is None else parser.feed(seq.delta_text)
                start, num_sent[i] = num_sent[i], len(seq.token_ids)
                logprobs = self._logprobs(seq, start, num_sent[i])
                calls: list[Any] = []
                if seq.finished and parser is not None:
                    rest, calls = parser.finish()
                    content += rest
                if content or logprobs:
                    yield sse(self._chunk(i, {"content": content}, logprobs=logprobs))
                if calls:
                    delta = {"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]}
                    yield sse(self._chunk(i, delta))
                if seq.finished:
                    yield sse(self._chunk(i, {}, self._finish_reason(seq, calls)))
        if final is not None and self.req.stream_options and \
                self.req.stream_options.include_usage:
            yield sse({"id": self.id, "object": "chat.completion.chunk",
                       "created": self.created, "model": self.state.model_name,
                       "choices": [], "usage": usage_of([final])})

