"""The proxy's keep-alive transport against small raw-socket servers (what uvicorn will not do)."""

from __future__ import annotations

import asyncio
import contextlib
import re

import httpx
import pytest

from proxy.http1 import KeepAliveTransport
from tests.conftest import free_port
from tests.proxy.conftest import Clock

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def serve_raw(handler) -> tuple[asyncio.AbstractServer, str]:
    """An asyncio server on a free loopback port running `handler(reader, writer)` per connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive server's handler: OK to every request on the connection, until the client hangs up."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
    writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (by its content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return await reader.readexactly(length)


async def test_chunked_response_one_write_requests_and_keep_alive():
    seen: list[bytes] = []
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
                         b"6\r\n{\"a\": \r\n2\r\n1}\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server, url = await serve_raw(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport()) as client:
        first = await client.post(url + "/v1/x?y=1", json={"q": 1})
        second = await client.post(url + "/v1/x", json={"q": 2})
    assert first.json() == {"a": 1} and second.status_code == 200
    assert seen == [b'{"q":1}', b'{"q":2}']
    assert connections == 1  # kept alive


async def test_an_idle_connection_the_server_closed_is_dropped_before_use():
    connections = 0
    closed = asyncio.Event()

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await read_request(reader)
        # Claims keep-alive, then hangs up: the socket in the client's pool is dead.
        writer.write(OK)
        writer.close()
        await writer.wait_closed()
        closed.set()

    server, url = await serve_raw(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport()) as client:
        responses = []
        for _ in range(3):
            closed.clear()
            responses.append(await client.post(url + "/", content=b"x"))
            await closed.wait()
    assert [r.text for r in responses] == ["ok"] * 3
    assert connections == 3


async def test_a_request_beyond_the_limit_waits_for_a_connection_up_to_the_pool_timeout():
    received = asyncio.Event()

    async def silent(reader, writer):
        await read_request(reader)
        received.set()
        await asyncio.sleep(30)

    server, url = await serve_raw(silent)
    timeout = httpx.Timeout(5.0, pool=0.2)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport(max_connections=1), timeout=timeout) as client:
        hanging = asyncio.create_task(client.post(url + "/", content=b"x"))
        await received.wait()  # it holds the only connection
        with pytest.raises(httpx.PoolTimeout) as waited:
            await client.post(url + "/", content=b"y")
        assert str(waited.value) == "all 1 upstream connections busy" and waited.value.request.url == url + "/"
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging


async def test_a_full_pool_closes_another_servers_idle_connection_to_make_room():
    first_server, first = await serve_raw(answer_ok)
    second_server, second = await serve_raw(answer_ok)
    third_server, third = await serve_raw(answer_ok)
    transport = KeepAliveTransport(max_connections=1)
    async with first_server, second_server, third_server, httpx.AsyncClient(transport=transport, timeout=5) as client:
        # The third finds the first server's stack already emptied, and must pass over it to the second's.
        replies = [await client.post(base + "/", content=b"x") for base in (first, second, third, first)]
    assert [r.text for r in replies] == ["ok"] * 4


async def test_refused_connection_timeout_and_a_malformed_answer_are_httpx_errors_that_free_their_place():
    async def silent(reader, writer):
        await asyncio.sleep(5)

    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")

    async def hang_up(reader, writer):
        await read_request(reader)
        writer.close()

    port = free_port()
    servers = {name: await serve_raw(handler) for name, handler in
               (("ok", answer_ok), ("silent", silent), ("garbage", garbage), ("hang_up", hang_up))}
    urls = {name: url + "/" for name, (_server, url) in servers.items()}
    failures = [(f"http://127.0.0.1:{port}/", httpx.ConnectError,
                 re.escape(f"cannot connect to 127.0.0.1:{port}: Connect call failed ('127.0.0.1', {port})")),
                (urls["silent"], httpx.ReadTimeout, re.escape("no response from 127.0.0.1 in time")),
                (urls["garbage"], httpx.RemoteProtocolError, "malformed response: .+"),  # then httptools' words
                (urls["hang_up"], httpx.ReadError,
                 re.escape("ConnectionError: the server closed the connection before answering"))]
    # One connection in all: each failure must give its place back for the next request to get one.
    transport = KeepAliveTransport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.3, pool=1.0)) as client:
        for url, kind, message in failures:
            with pytest.raises(kind) as failed:
                await client.post(url, content=b"x")
            assert re.fullmatch(message, str(failed.value)) and str(failed.value.request.url) == url
            assert (await client.post(urls["ok"], content=b"x")).text == "ok"
    for server, _url in servers.values():
        server.close()


async def test_a_connect_that_takes_too_long_is_a_connect_timeout(monkeypatch):
    async def unanswered(*_args, **_kwargs):
        await asyncio.sleep(2)
        raise AssertionError("the connect timeout did not apply")

    monkeypatch.setattr("proxy.http1.asyncio.open_connection", unanswered)
    timeout = httpx.Timeout(5.0, connect=0.1)
    async with httpx.AsyncClient(transport=KeepAliveTransport(max_connections=1), timeout=timeout) as client:
        for _ in range(2):  # the second finds the place the first held free again
            with pytest.raises(httpx.ConnectTimeout) as timed_out:
                await client.post("http://upstream.test:8080/v1/x", content=b"x")
            assert str(timed_out.value) == "connecting to upstream.test:8080 timed out"
            assert str(timed_out.value.request.url) == "http://upstream.test:8080/v1/x"


async def test_the_default_port_follows_the_scheme(monkeypatch):
    transport = KeepAliveTransport()
    asked: list[tuple[str, str, int]] = []

    async def connect(key, _timeout, request):
        asked.append(key)
        raise httpx.ConnectError("not here", request=request)

    monkeypatch.setattr(transport, "_connect", connect)
    async with httpx.AsyncClient(transport=transport) as client:
        for url in ("http://upstream.test/v1", "https://upstream.test/v1", "http://upstream.test:8080/v1"):
            with pytest.raises(httpx.ConnectError):
                await client.post(url, content=b"x")
    assert asked == [("http", "upstream.test", 80), ("https", "upstream.test", 443), ("http", "upstream.test", 8080)]


async def test_https_is_tls_verified_by_default_or_by_the_given_context():
    import ssl

    import trustme

    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    server = await asyncio.start_server(answer_ok, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    plain_server, plain_url = await serve_raw(answer_ok)
    async with server, plain_server:
        async with httpx.AsyncClient(transport=KeepAliveTransport(ssl_context=trusting), timeout=5) as client:
            assert (await client.post(url, content=b"x")).text == "ok"
            assert (await client.post(plain_url + "/", content=b"x")).text == "ok"  # http stays plain
        async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs only
                await client.post(url, content=b"x")


async def test_a_body_the_server_ends_by_closing_is_read_whole_with_its_headers():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-upstream: raw\r\n\r\nthe whole body")
        await writer.drain()
        writer.close()

    server, url = await serve_raw(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport(), timeout=5) as client:
        replies = [await client.post(url + "/", content=b"x") for _ in range(2)]
    assert [(r.text, r.headers["x-upstream"], r.headers["content-type"]) for r in replies] == [
        ("the whole body", "raw", "text/plain")] * 2
    assert connections == 2  # a connection its server closed is never reused


async def test_a_request_goes_out_with_one_length_and_its_headers_as_given():
    heads: list[list[str]] = []
    bodies: list[bytes] = []

    async def handler(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.decode("latin-1").split("\r\n")[:-2]
            heads.append(lines)
            length = [int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")]
            bodies.append(await reader.readexactly(length[0] if length else 0))
            writer.write(OK)
        writer.close()

    async def streamed():
        yield b"hello "
        yield b"world"

    server, url = await serve_raw(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport(), timeout=5) as client:
        await client.post(url + "/v1/x?y=1", content=streamed(), headers={"X-Trace": "t-1"})  # chunked, to httpx
        await client.post(url + "/v1/y", json={"q": "é"})
    streamed_head, json_head = heads
    assert streamed_head[0] == "POST /v1/x?y=1 HTTP/1.1" and "X-Trace: t-1" in streamed_head
    assert not any(line.lower().startswith("transfer-encoding") for line in streamed_head)
    assert [line for line in streamed_head if line.lower().startswith("content-length")] == ["Content-Length: 11"]
    assert [line.lower() for line in json_head if line.lower().startswith("content-length")] == [
        f"content-length: {len(bodies[1])}"]
    assert bodies == [b"hello world", '{"q":"é"}'.encode()]


async def test_idle_connections_expire_when_taken_and_when_another_is_released():
    arrived, both = [], asyncio.Event()
    opened, closed = 0, 0
    closed_now = asyncio.Event()

    async def handler(reader, writer):
        nonlocal opened, closed
        opened += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            arrived.append(1)
            if len(arrived) == 2:
                both.set()
            await both.wait()  # the first two requests are answered together: two connections
            writer.write(OK)
        closed += 1
        closed_now.set()
        writer.close()

    clock = Clock()
    server, url = await serve_raw(handler)
    transport = KeepAliveTransport(keepalive_expiry=4.0, clock=clock)
    async with server, httpx.AsyncClient(transport=transport, timeout=5) as client:
        await asyncio.gather(*(client.post(url + "/", content=b"x") for _ in range(2)))  # both idle at 1000
        clock.now += 3
        await client.post(url + "/", content=b"x")  # the newer, 3 s idle: reused; the older not yet past 4 s
        assert (opened, closed) == (2, 0)
        clock.now += 3
        await client.post(url + "/", content=b"x")  # reused; released 6 s after the older: that one is closed
        await asyncio.wait_for(closed_now.wait(), 5)
        assert (opened, closed) == (2, 1)
        closed_now.clear()
        clock.now += 5
        await client.post(url + "/", content=b"x")  # 5 s idle: closed before use, and a new one opened
        await asyncio.wait_for(closed_now.wait(), 5)
        assert (opened, closed) == (3, 2)
