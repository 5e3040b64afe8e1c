"""The request body size limit (MAX_BODY_BYTES): a 413 before anything is parsed, on every route."""

from __future__ import annotations

import contextlib
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLarge(Exception):
    """Raised from `receive` once a streamed body passes the limit; it stops whatever is reading the body."""


class BodySizeLimit:
    """Pure ASGI, so the body is never buffered: a declared Content-Length over the limit is refused unread,
    and a chunked body is counted as it streams in and cut off at the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _content_length(scope) > self.max_bytes:
            await self._refuse(send)
            return

        received = 0
        over = started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                # Whatever the app makes of the cut-off body (FastAPI: a 400) gives way to the 413 below.
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"message": f"request body over {self.max_bytes} bytes"}).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            # The rest of the body is never read, so the connection cannot carry another request.
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int:
    """The declared length, or -1 (chunked, or a value the server would have refused anyway)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1
