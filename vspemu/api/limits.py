"""Request limits, before any route runs: a bounded request body and a bounded number of requests at once.

A body larger than :data:`MAX_BODY_BYTES` is refused with 413 (KART40066-E) before it is read: at once when
its Content-Length says so, else as soon as the streamed (chunked) bytes pass the limit; the connection is
then closed, so the rest is never read. At most :data:`MAX_CONCURRENT` requests are handled at once; a request
over the cap waits up to :data:`QUEUE_WAIT` seconds for a slot, then gets 503 (KART00003-E, server busy),
which clients retry. The body is read into memory only once the request holds a slot, so memory held by
request bodies is bounded by ``MAX_CONCURRENT * MAX_BODY_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vspemu.errors import VspError

MAX_BODY_BYTES = 1 << 20  # the largest body a real client sends is a few hundred bytes (api-spec: JSON objects)
MAX_CONCURRENT = 256  # requests held at once, including those waiting for a job (Response-Job-Status)
QUEUE_WAIT = 2.0  # seconds a request over the cap waits for a slot before 503


class RequestLimits:
    """Pure ASGI middleware (it must see the body as a stream, before Starlette buffers it)."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES, max_concurrent: int = MAX_CONCURRENT,
                 queue_wait: float = QUEUE_WAIT) -> None:
        self.app = app
        self.max_body = max_body
        self.queue_wait = queue_wait
        self._slots = asyncio.Semaphore(max_concurrent)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await _answer(send, path, VspError("BODY_TOO_LARGE", limit=self.max_body), close=True)
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.queue_wait)
        except TimeoutError:
            await _answer(send, path, VspError("BUSY", detail="too many requests at once"))
            return
        try:
            chunks: list[bytes] = []
            total = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away before sending its body
                body = message.get("body", b"")
                total += len(body)
                if total > self.max_body:
                    await _answer(send, path, VspError("BODY_TOO_LARGE", limit=self.max_body), close=True)
                    return
                chunks.append(body)
                more = bool(message.get("more_body", False))
            await self.app(scope, _replay(b"".join(chunks), receive), send)
        finally:
            self._slots.release()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.strip()
            if text.isdigit():  # bytes.isdigit() is ASCII-only
                return int(text)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only http.disconnect

    return replay


async def _answer(send: Send, path: str, err: VspError, close: bool = False) -> None:
    payload = json.dumps(err.body(path)).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    start: dict[str, Any] = {"type": "http.response.start", "status": err.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": payload, "more_body": False})
