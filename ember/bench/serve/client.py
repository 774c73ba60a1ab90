"""One streamed OpenAI request (chat or completions) timed chunk by chunk, and GET /v1/models.

Parses Server-Sent Events (`data: {...}`, `data: [DONE]`); never raises for a failed request,
it returns a `RequestResult` with the HTTP status and the OpenAI error message instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestResult:
    """What one request measured; times in seconds, `start_s` relative to the run's start."""

    request_idx: int
    session_id: str | None = None
    turn_idx: int | None = None
    start_s: float = 0.0
    success: bool = False
    status: int | None = None  # HTTP status; None when no response came (connection error)
    error: str | None = None
    ttft_s: float | None = None  # request sent -> first chunk carrying content
    e2e_s: float | None = None  # request sent -> end of stream
    itl_s: list[float] = field(default_factory=list)  # gaps between successive content chunks
    num_content_chunks: int = 0
    prompt_tokens: int | None = None  # from usage
    completion_tokens: int | None = None  # from usage; content chunks when usage is missing
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    has_usage: bool = False
    finish_reason: str | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (completion_tokens - 1): per-token time even when a chunk has several."""
        if not self.success or self.ttft_s is None or not self.completion_tokens \
                or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        ms = (lambda s: None if s is None else round(s * 1e3, 3))  # noqa: E731
        return {
            "request_idx": self.request_idx, "session_id": self.session_id,
            "turn_idx": self.turn_idx, "start_ms": ms(self.start_s), "success": self.success,
            "status": self.status, "error": self.error, "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s), "e2e_ms": ms(self.e2e_s),
            "itl_ms": [ms(g) for g in self.itl_s], "num_content_chunks": self.num_content_chunks,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens, "has_usage": self.has_usage,
            "finish_reason": self.finish_reason,
        }


def build_payload(endpoint: str, model: str, max_tokens: int, *, ignore_eos: bool,
                  messages: list[dict[str, Any]] | None = None,
                  prompt: str | None = None) -> dict[str, Any]:
    """A streamed request body asking for usage in the last chunk (greedy, for repeatability)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: generate exactly max_tokens
    return body


def _chunk_text(choice: dict[str, Any]) -> tuple[bool, str]:
    """(carries output, its answer text) for one streamed choice of either endpoint."""
    if "text" in choice:  # completions
        text = choice.get("text") or ""
        return bool(text), text
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    has_output = bool(text or delta.get("reasoning_content") or delta.get("reasoning")
                      or delta.get("tool_calls"))
    return has_output, text


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


async def send_request(http: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                       headers: dict[str, str], result: RequestResult,
                       t0: float) -> RequestResult:
    """POST `payload` and read its stream into `result` (which carries the ids); `t0`: run start."""
    parts: list[str] = []
    start = time.perf_counter()
    result.start_s = start - t0
    last = None
    try:
        async with http.post(url, json=payload, headers=headers) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = _error_message(await resp.text())
                result.e2e_s = time.perf_counter() - start
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = _error_message(data.decode())
                    break
                for choice in chunk.get("choices") or ():
                    has_output, text = _chunk_text(choice)
                    if has_output:
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.num_content_chunks += 1
                        parts.append(text)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    _read_usage(result, chunk["usage"])
        result.e2e_s = time.perf_counter() - start
        result.success = result.error is None
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.e2e_s = time.perf_counter() - start
    result.text = "".join(parts)
    if not result.has_usage:
        result.completion_tokens = result.num_content_chunks
    return result


def _read_usage(result: RequestResult, usage: dict[str, Any]) -> None:
    result.has_usage = True
    result.prompt_tokens = usage.get("prompt_tokens")
    result.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        result.cached_tokens = details["cached_tokens"]


async def fetch_first_model(http: aiohttp.ClientSession, base_url: str,
                            headers: dict[str, str]) -> str:
    """The first model id of GET /v1/models; ValueError naming the URL when there is none."""
    url = base_url + "/v1/models"
    try:
        async with http.get(url, headers=headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ValueError(f"GET {url}: HTTP {resp.status}: {_error_message(body)}")
    except aiohttp.ClientError as exc:
        raise ValueError(f"GET {url}: {exc}") from exc
    models = json.loads(body).get("data") or []
    if not models:
        raise ValueError(f"GET {url} lists no model; pass --model")
    return models[0]["id"]
