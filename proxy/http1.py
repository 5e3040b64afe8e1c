"""A lean HTTP/1.1 keep-alive transport for httpx, for the proxy's upstream calls.

httpx's default pool (httpcore) costs about a millisecond of CPU per call here: it polls every
idle connection for readability on each checkout and writes headers and body separately
(bench/proxy_overhead.py, docs/BENCHMARKS.md). The upstream calls are small JSON POSTs to a
handful of servers, so this transport keeps per-host stacks of idle connections, writes each
request in one go and parses responses with httptools (the parser uvicorn uses). The client API
stays `httpx.AsyncClient`, so tests can still swap in `httpx.MockTransport`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import defaultdict

import httptools
import httpx


class _ResponseReader:
    """httptools callbacks that collect one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.headers_done = False
        self.complete = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        self.writer.write(request)
        collected = _ResponseReader()
        parser = httptools.HttpResponseParser(collected)
        while not collected.complete:
            data = await self.reader.read(65536)
            if not data:
                if collected.headers_done:  # a body delimited by the connection closing
                    return parser.get_status_code(), collected.headers, bytes(collected.body), False
                # Closed before a response: on a pooled connection that the server had already
                # given up on, nothing was processed and a retry is safe.
                raise _Closed(received=bool(collected.headers))
            parser.feed_data(data)
        return parser.get_status_code(), collected.headers, bytes(collected.body), parser.should_keep_alive()

    def close(self) -> None:
        self.writer.close()


class _Closed(ConnectionError):
    def __init__(self, *, received: bool) -> None:
        super().__init__("connection closed by the server")
        self.received = received


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_idle_per_host: int = 256, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = defaultdict(list)
        self._max_idle = max_idle_per_host
        self._ssl = ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        payload = _serialize(request, await request.aread())
        for attempt in range(2):
            pooled = bool(self._idle[key])
            connection = self._idle[key].pop() if pooled else await self._connect(key, timeouts.get("connect"))
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    status, headers, body, keep_alive = await connection.exchange(payload)
            except TimeoutError as error:
                connection.close()
                raise httpx.ReadTimeout(f"no response from {url.host} in time", request=request) from error
            except (_Closed, ConnectionError, OSError) as error:
                connection.close()
                # A pooled connection the server had already closed: retry once on a new one.
                if attempt == 0 and pooled and not getattr(error, "received", False):
                    continue
                raise httpx.ReadError(f"{type(error).__name__}: {error}", request=request) from error
            if keep_alive and len(self._idle[key]) < self._max_idle:
                self._idle[key].append(connection)
            else:
                connection.close()
            return httpx.Response(status, headers=headers, content=body, request=request)
        raise AssertionError("unreachable")

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Connection:
        scheme, host, port = key
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
        except TimeoutError as error:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from error
        except OSError as error:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error.strerror or error}") from error
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path.decode("ascii")
    lines = [f"{request.method} {target} HTTP/1.1"]
    has_length = False
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            continue  # the body is already whole: send it with a length
        has_length = has_length or lowered == b"content-length"
        lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    if not has_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
