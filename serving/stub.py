"""A stdlib OpenAI-compatible stub upstream that answers at once.

For load tests and benchmarks, where the real model would hide the proxy's own cost, and for
tests that need an upstream on loopback. It is not a model: every answer says it is a stub.

    python -m serving.stub --port 9100 [--delay-ms 0] [--status 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_MAX_HEADER = 64 * 1024
_RECENT = 1000  # requests a stub remembers for a test to look at; a load test's millions are only counted


@dataclass(frozen=True)
class StubRequest:
    line: str  # "POST /v1/chat/completions HTTP/1.1"
    authorization: str | None
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _StubProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; enough of it for JSON POSTs from httpx, aiohttp and wrk."""

    def __init__(self, server: StubUpstream) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server.connection_opened()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Without this, Nagle's algorithm can hold small replies back for 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connection_closed()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self._buffer) > _MAX_HEADER:
                    self._transport.close()
                return
            head = self._buffer[:head_end].decode("latin-1")
            length, authorization = 0, None
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "authorization":
                    authorization = value.strip()
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body, self._buffer = self._buffer[head_end + 4 : end], self._buffer[end:]
            request_line = head.split("\r\n", 1)[0]
            self._server.requests += 1
            self._server.recent.append(StubRequest(request_line, authorization, body))
            if self._server.delay_s:
                asyncio.get_running_loop().call_later(
                    self._server.delay_s, self._respond, request_line, body
                )
            else:
                self._respond(request_line, body)

    def _respond(self, request_line: str, body: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        status, payload = self._server.reply(request_line, body)
        reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
        # One write per response: header and body together.
        self._transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n".encode() + payload
        )


class StubUpstream:
    """Answers `POST /v1/chat/completions` with a fixed completion, `GET /v1/models` with its model."""

    def __init__(self, *, model: str = "stub-model", answer: str = "This is a stub answer.",
                 delay_s: float = 0.0, status: int = 200) -> None:
        self.model = model
        self.answer = answer
        self.delay_s = delay_s
        self.status = status
        self.requests = 0
        self.recent: deque[StubRequest] = deque(maxlen=_RECENT)  # the last requests, oldest first
        self.connections = 0  # open now
        self.peak_connections = 0  # the most open at once: what a client's pool limit allows

    def connection_opened(self) -> None:
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)

    def connection_closed(self) -> None:
        self.connections -= 1

    def reply(self, request_line: str, body: bytes) -> tuple[int, bytes]:
        if self.status != 200:
            return self.status, b'{"error": {"message": "stub configured to fail", "type": "stub"}}'
        if request_line.startswith("GET") and "/models" in request_line:
            return 200, json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]}).encode()
        try:
            model = json.loads(body or b"{}").get("model", self.model)
        except ValueError:
            return 400, b'{"error": {"message": "invalid JSON", "type": "invalid_request_error"}}'
        return 200, json.dumps(
            {
                "id": "stub-completion",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        ).encode()

    async def serve(self, host: str, port: int) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _StubProtocol(self), host, port, backlog=1024)


@contextmanager
def running_stub(**kwargs) -> Iterator[tuple[StubUpstream, str]]:
    """Run a stub in a background thread on a free loopback port; yields (stub, base_url)."""
    stub = StubUpstream(**kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.AbstractServer] = {}

    def _run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"] = loop.run_until_complete(stub.serve("127.0.0.1", 0))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=_run, name="stub-upstream", daemon=True)
    thread.start()
    started.wait(10)
    port = holder["server"].sockets[0].getsockname()[1]
    try:
        yield stub, f"http://127.0.0.1:{port}/v1"
    finally:
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=200)
    args = parser.parse_args()
    stub = StubUpstream(delay_s=args.delay_ms / 1000, status=args.status)

    async def _serve() -> None:
        server = await stub.serve(args.host, args.port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(_serve())
    except ImportError:
        asyncio.run(_serve())


if __name__ == "__main__":
    main()
