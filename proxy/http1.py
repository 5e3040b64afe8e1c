"""A lean HTTP/1.1 keep-alive transport for httpx, for the proxy's upstream calls.

Why not httpx's own pool: httpcore 1.0's pool walks every connection, polls every idle socket and
counts all connections once per idle one on each request, so its cost per call grows with the calls
in flight. Against an upstream that answers in 500 ms, with 256 calls in flight (what a model server
holds under load), it took 10 ms of CPU per call and managed 36 calls/s where the upstream allowed
510; this transport took 0.3 ms per call and kept up (bench/upstream_transport.py, docs/BENCHMARKS.md,
"Upstream transport (issue 11)"). The calls are small JSON POSTs to a handful of servers, so this
keeps a stack of idle connections per server, writes each request in one go and parses responses
with httptools (the parser uvicorn uses). The client API stays `httpx.AsyncClient`, so tests can
still swap in `httpx.MockTransport`.

What it promises (tests/proxy/test_upstream_transport.py, tests/proxy/test_http1.py):
  * at most `max_connections` open at once, idle ones included; a request beyond that waits its
    turn for one, up to the pool timeout (`httpx.PoolTimeout`);
  * a request that is cancelled, times out or fails closes its connection: its response may still
    be on the way, so the connection cannot carry another request;
  * a request is sent once. An idle connection the server has closed is dropped before use; one that
    breaks after the request was written is an error, never a retry (the server may have acted on it).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Callable

import httptools
import httpx

_Key = tuple[str, str, int]


class _ResponseReader:
    """httptools callbacks that collect one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.headers_done = False
        self.complete = False
        self.keep_alive = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        # Only now: once the message is done the parser resets and always says False.
        self.keep_alive = self.parser.should_keep_alive()


class _Connection:
    def __init__(self, key: _Key, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.key = key
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def is_reusable(self, now: float, expiry: float) -> bool:
        if now - self.idle_since > expiry or self.writer.is_closing() or self.reader.at_eof():
            return False
        # Nothing is due on an idle HTTP/1.1 connection: if it reads, the server closed it (or sent
        # junk), and the event loop may not have noticed yet. One poll, on this connection only.
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()  # not select.select: it cannot take descriptors above 1023
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    async def exchange(self, request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        self.writer.write(request)
        collected = _ResponseReader()
        while not collected.complete:
            data = await self.reader.read(65536)
            if not data:
                if collected.headers_done:  # a body delimited by the connection closing
                    return collected.parser.get_status_code(), collected.headers, bytes(collected.body), False
                raise ConnectionError("the server closed the connection before answering")
            collected.parser.feed_data(data)
        return collected.parser.get_status_code(), collected.headers, bytes(collected.body), collected.keep_alive

    def close(self) -> None:
        self.writer.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 256,
        # Under the 5 s keep-alive timeout of uvicorn (vLLM's server) and Node: an idle connection is
        # dropped before the server is likely to be closing it just as a request goes out.
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,  # what idle ages are read on (tests move it by hand)
    ) -> None:
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._clock = clock
        self._idle: dict[_Key, deque[_Connection]] = defaultdict(deque)  # oldest left, reused from the right
        self._open = 0  # connections open or being opened, idle ones included
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        timeouts = request.extensions.get("timeout", {})
        payload = _serialize(request, await request.aread())
        connection = await self._acquire(key, timeouts, request)
        try:
            async with asyncio.timeout(timeouts.get("read")):
                status, headers, body, keep_alive = await connection.exchange(payload)
        except BaseException as error:
            self._discard(connection)
            if isinstance(error, TimeoutError):
                raise httpx.ReadTimeout(f"no response from {url.host} in time", request=request) from error
            if isinstance(error, httptools.HttpParserError):
                raise httpx.RemoteProtocolError(f"malformed response: {error}", request=request) from error
            if isinstance(error, OSError):  # ConnectionError included
                raise httpx.ReadError(f"{type(error).__name__}: {error}", request=request) from error
            raise
        if keep_alive:
            self._release(connection)
        else:
            self._discard(connection)
        return httpx.Response(status, headers=headers, content=body, request=request)

    async def _acquire(self, key: _Key, timeouts: dict[str, float | None], request: httpx.Request) -> _Connection:
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                while True:
                    connection = self._take_idle(key)
                    if connection is not None:
                        return connection
                    if self._open < self._max or self._close_idle_elsewhere(key):
                        break
                    await self._wait()
        except TimeoutError as error:
            raise httpx.PoolTimeout(f"all {self._max} upstream connections busy", request=request) from error
        self._open += 1
        try:
            return await self._connect(key, timeouts.get("connect"), request)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def _take_idle(self, key: _Key) -> _Connection | None:
        stack = self._idle.get(key)
        now = self._clock()
        while stack:
            connection = stack.pop()
            if connection.is_reusable(now, self._expiry):
                return connection
            self._discard(connection)
        return None

    def _close_idle_elsewhere(self, key: _Key) -> bool:
        """Make room by closing another server's idle connection, the longest idle first."""
        for other, stack in self._idle.items():
            if other != key and stack:
                self._discard(stack.popleft())
                return True
        return False

    async def _wait(self) -> None:
        """Until a connection is released or closed; first come, first woken."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken and cancelled at once: pass the turn on
            else:
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, connection: _Connection) -> None:
        connection.idle_since = self._clock()
        stack = self._idle[connection.key]
        stack.append(connection)
        # Expired ones sink to the bottom of the stack: close them here rather than on next use.
        while stack and connection.idle_since - stack[0].idle_since > self._expiry:
            self._discard(stack.popleft())
        self._wake()

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1
        self._wake()

    async def _connect(self, key: _Key, timeout: float | None, request: httpx.Request) -> _Connection:
        scheme, host, port = key
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
        except TimeoutError as error:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from error
        except OSError as error:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error.strerror or error}",
                                     request=request) from error
        return _Connection(key, reader, writer)

    async def aclose(self) -> None:
        for stack in self._idle.values():
            while stack:
                self._discard(stack.popleft())


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
