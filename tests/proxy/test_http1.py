"""The proxy's keep-alive transport against small raw-socket servers (what uvicorn will not do)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.http1 import KeepAliveTransport
from tests.conftest import free_port

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def serve_raw(handler) -> tuple[asyncio.AbstractServer, str]:
    """An asyncio server on a free loopback port running `handler(reader, writer)` per connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


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
        with pytest.raises(httpx.PoolTimeout):
            await client.post(url + "/", content=b"y")
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging


async def test_a_full_pool_closes_another_servers_idle_connection_to_make_room():
    async def answer(reader, writer):
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(OK)
        writer.close()

    first_server, first = await serve_raw(answer)
    second_server, second = await serve_raw(answer)
    transport = KeepAliveTransport(max_connections=1)
    async with first_server, second_server, httpx.AsyncClient(transport=transport, timeout=5) as client:
        replies = [await client.post(base + "/", content=b"x") for base in (first, second, first)]
    assert [r.text for r in replies] == ["ok"] * 3


async def test_refused_connection_timeout_and_a_malformed_answer_are_httpx_errors():
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=0.3) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{free_port()}/", content=b"x")

        async def silent(reader, writer):
            await asyncio.sleep(5)

        server, url = await serve_raw(silent)
        async with server:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/", content=b"x")

        async def garbage(reader, writer):
            await read_request(reader)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")

        server, url = await serve_raw(garbage)
        async with server:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(url + "/", content=b"x")
