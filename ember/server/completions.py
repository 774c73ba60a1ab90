"""POST /v1/completions: one or several prompts (text or token ids), streamed or not, with echo,
logprobs and usage. Choice `i * n + j` is sequence j of prompt i, as in OpenAI's API."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ember.engine.outputs import CompletionOutput, RequestOutput
from ember.server.kv_transfer import engine_kv_transfer, prefill_result
from ember.server.logprobs import completion_logprobs
from ember.server.protocol import CompletionRequest
from ember.server.sampling import (
    build_sampling_params,
    resolve_max_tokens,
    structured_output_for,
)
from ember.server.state import ServerState
from ember.server.streaming import event_stream, first_outputs, merged, sse, until_disconnect
from ember.server.usage import cached_tokens_header, usage_of

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


logger = logging.getLogger(__name__)


def completion_prompts(req: CompletionRequest,
                       tokenizer: Any) -> list[tuple[str | None, list[int]]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        texts = [prompt]
    else:
        texts = list(prompt)
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in texts]


async def create_completion(req: CompletionRequest, request: Request,
                            state: ServerState) -> Response:
    state.check_model(req.model)
    state.admit()
    prompts = completion_prompts(req, state.tokenizer)
    structured = structured_output_for(req.response_format)
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = []
    for _, ids in prompts:
        max_tokens = resolve_max_tokens(req.max_tokens, DEFAULT_MAX_TOKENS, len(ids),
                                        state.max_model_len, "prompt")
        params.append(build_sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                            prompt_logprobs=prompt_logprobs,
                                            structured_output=structured))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    if req.user:
        logger.info("%s is for user %r", request_id, req.user)
    kv_transfer = engine_kv_transfer(req.kv_transfer_params, stream=req.stream,
                                     num_prompts=len(prompts))
    streams = [state.generate({"prompt": text, "prompt_token_ids": ids} if text is not None
                              else ids, p, f"{request_id}-{i}", kv_transfer)
               for i, ((text, ids), p) in enumerate(zip(prompts, params))]
    firsts = await until_disconnect(request, first_outputs(streams))
    view = _CompletionView(req, state, request_id)
    if req.stream:
        return event_stream(view.events(merged(streams, firsts)), cached_tokens_header(firsts))
    finals: list[RequestOutput | None] = list(firsts)
    async def collect() -> None:
        async for i, out in merged(streams, firsts):
            finals[i] = out
    await until_disconnect(request, collect())
    done = [f for f in finals if f is not None]
    return JSONResponse({**view.response(done), **prefill_result(kv_transfer, done)},
                        headers=cached_tokens_header(firsts))


class _CompletionView:
    """Shapes engine outputs as completion responses and chunks."""

    def __init__(self, req: CompletionRequest, state: ServerState, request_id: str) -> None:
        self.req = req
        self.state = state
        self.id = request_id
        self.created = int(time.time())

    def _choice_text(self, out: RequestOutput, seq: CompletionOutput, text: str,
                     is_first: bool) -> str:
        if self.req.echo and is_first:
            prompt = out.prompt if out.prompt is not None else self.state.tokenizer.decode(
                out.prompt_token_ids)
            return prompt + text
        return text

    def _logprobs(self, out: RequestOutput, seq: CompletionOutput, start: int,
                  end: int, echo_prompt: bool) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        ids = seq.token_ids[start:end]
        positions: list[Any] = (seq.logprobs or [])[start:end]
        if echo_prompt and out.prompt_logprobs is not None:
            ids = out.prompt_token_ids + ids
            positions = list(out.prompt_logprobs) + positions
        result = completion_logprobs(ids, positions, self.req.logprobs, 0)
        if echo_prompt and out.prompt_token_ids and out.prompt_logprobs is not None:
            result["tokens"][0] = self.state.tokenizer.decode(out.prompt_token_ids[:1])
        return result

    def response(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outs):
            for seq in out.outputs:
                choices.append({
                    "index": i * self.req.n + seq.index,
                    "text": self._choice_text(out, seq, seq.text, True),
                    "logprobs": self._logprobs(out, seq, 0, len(seq.token_ids), self.req.echo),
                    "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason,
                })
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.state.model_name, "choices": choices, "usage": usage_of(outs)}

    async def events(self, outputs: AsyncIterator[tuple[int, RequestOutput]]
                     ) -> AsyncIterator[str]:
        num_sent: dict[tuple[int, int], int] = {}  # tokens already streamed per choice
        latest: dict[int, RequestOutput] = {}
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        async for i, out in outputs:
            latest[i] = out
            for seq in out.outputs:
                key = (i, seq.index)
                is_first = key not in num_sent
                start = num_sent.get(key, 0)
                end = len(seq.token_ids)
                if not (seq.delta_text or seq.finished or (is_first and self.req.echo)):
                    continue  # held-back text: its tokens go out with the next chunk
                num_sent[key] = end
                chunk = {"id": self.id, "object": "text_completion", "created": self.created,
                         "model": self.state.model_name, "choices": [{
                             "index": i * self.req.n + seq.index,
                             "text": self._choice_text(out, seq, seq.delta_text, is_first),
                             "logprobs": self._logprobs(out, seq, start, end,
                                                        self.req.echo and is_first),
                             "finish_reason": seq.finish_reason,
                             "stop_reason": seq.stop_reason}]}
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
        if include_usage:
            yield sse({"id": self.id, "object": "text_completion", "created": self.created,
                       "model": self.state.model_name, "choices": [],
                       "usage": usage_of(list(latest.values()))})
