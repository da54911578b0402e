"""Request bodies are bounded, and only a caller with a valid key gets one read.

Every route that takes a body needs an API key. This ASGI middleware checks the key and the
declared ``Content-Length`` before the route (and FastAPI's body parsing) sees the request, and
counts the bytes as they arrive: an unauthenticated or oversized body is answered 401 or 413
without ever being held whole. JSON bodies (training start, organisations, keys, join tokens)
may be ``MAX_JSON_BODY_BYTES``; model uploads and ``/sync_model`` up to ``max_blob_bytes``.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from federated_learning.dashboard.auth import presented_key, principal_for
from federated_learning.services.runtime import ServiceContext

MAX_JSON_BODY_BYTES = 1 << 20
BLOB_PATHS = ("/sync_model", "/api/models")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(Exception):
    """The body went past its limit while it was read."""


class BodyGuard:
    def __init__(self, app: ASGIApp, ctx: ServiceContext) -> None:
        self.app = app
        self.ctx = ctx

    def limit_for(self, path: str) -> int:
        return self.ctx.settings.max_blob_bytes if path.startswith(BLOB_PATHS) else MAX_JSON_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path, limit = scope["path"], self.limit_for(scope["path"])
        declared = headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            await self.refuse(send, path, 400, "bad_header", f"{path}: Content-Length {declared[:40]!r} is not a number")
            return
        if declared is not None and int(declared) > limit:
            await self.refuse(send, path, 413, "too_large", f"{path}: body of {declared} bytes exceeds {limit}")
            return
        if await principal_for(self.ctx, presented_key(headers.get("x-api-key"), headers.get("authorization"))) is None:
            await self.refuse(send, path, 401, "unauthorized", "missing, wrong, revoked or expired API key",
                              extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        received = 0
        too_large = answered = False

        async def counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def replaced(message: Message) -> None:
            # Whatever the route answers to a body cut short (FastAPI: 400), the caller gets 413.
            nonlocal answered
            if not too_large:
                await send(message)
            elif not answered:
                answered = True
                await self.refuse(send, path, 413, "too_large", f"{path}: body exceeds {limit} bytes")

        try:
            await self.app(scope, counted, replaced)
        except BodyTooLarge:
            pass
        if too_large and not answered:
            await self.refuse(send, path, 413, "too_large", f"{path}: body exceeds {limit} bytes")

    async def refuse(self, send: Send, path: str, status: int, reason: str, detail: str,
                     extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        source = "sync" if path.startswith("/sync_model") else "rest"
        await self.ctx.reject(source, reason, detail)
        body = json.dumps({"detail": detail if status != 401 else "missing, wrong, revoked or expired API key"}
                          ).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(extra_headers or [])]})
        await send({"type": "http.response.body", "body": body})
