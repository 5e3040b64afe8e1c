"""The proxy's keep-alive transport against small raw-socket servers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.http1 import KeepAliveTransport
from tests.conftest import free_port


async def _serve(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return await reader.readexactly(length)


async def test_chunked_response_and_one_write_requests():
    seen: list[bytes] = []

    async def handler(reader, writer):
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
                         b"6\r\n{\"a\": \r\n2\r\n1}\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport()) as client:
        first = await client.post(url + "/v1/x?y=1", json={"q": 1})
        second = await client.post(url + "/v1/x", json={"q": 2})
    assert first.json() == {"a": 1} and second.status_code == 200
    assert seen == [b'{"q":1}', b'{"q":2}']


async def test_a_connection_the_server_closed_is_retried_on_a_fresh_one():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        await _read_request(reader)
        # Claims keep-alive, then hangs up: the next request on this socket finds it dead.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    async with server, httpx.AsyncClient(transport=KeepAliveTransport()) as client:
        responses = [await client.post(url + "/", content=b"x") for _ in range(3)]
    assert [r.text for r in responses] == ["ok"] * 3
    assert connections == 3


async def test_refused_connection_and_timeout_are_httpx_errors():
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=0.3) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{free_port()}/", content=b"x")

        async def silent(reader, writer):
            await asyncio.sleep(5)

        server, url = await _serve(silent)
        async with server:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/", content=b"x")
