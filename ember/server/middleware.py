"""ASGI middleware in front of every route: the API key (401) and the body-size bound (413).

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ember.server.errors import error_body

Scope = dict[str, Any]


async def _send_error(send: Any, status: int, message: str, param: str | None = None,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on the protected routes (/v1 by default)."""

    def __init__(self, app: Any, api_key: str, protected: tuple[str, ...] = ("/v1",)) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                           else "invalid API key")
                await _send_error(send, 401, message,
                                  headers=[(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while reading a chunked
    body (which is then replayed to the app)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        await _send_error(send, 413, f"the request body is larger than {self.max_bytes} bytes")
