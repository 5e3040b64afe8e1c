"""The proxy's upstream client (`Upstream` on proxy/http1.py) against real servers on loopback.

uvicorn serves a chat completion and counts its TCP connections (a protocol subclass that counts in
`connection_made`/`connection_lost`); the server that takes a POST and then hangs up without an
answer is a raw asyncio one, because uvicorn always answers a request it has read.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
import uvicorn
from fastapi import Body, FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from proxy.upstream import AllArmsFailed, Target, Upstream
from tests.proxy.test_http1 import read_request, serve_raw

LIMIT = 8


class _Connections:
    """A server's TCP connections: open now, most open at once, opened in all."""

    def __init__(self) -> None:
        self.open = self.peak = self.total = 0


def _counting(connections: _Connections) -> type[H11Protocol]:
    class Counting(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            connections.open += 1
            connections.total += 1
            connections.peak = max(connections.peak, connections.open)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            connections.open -= 1

    return Counting


@asynccontextmanager
async def _serve(app: FastAPI, connections: _Connections, **config: Any) -> AsyncIterator[str]:
    """uvicorn on a free loopback port, in this event loop; yields the OpenAI base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=_counting(connections), lifespan="off", log_level="warning",
                                           timeout_graceful_shutdown=5, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # it failed to start: raise why
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _chat_app(received: Counter, gate: asyncio.Event | None = None) -> FastAPI:
    """Answers a chat completion, counting POSTs per call id (the last message); waits on `gate` if any."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(body: Annotated[dict[str, Any], Body()]) -> dict:
        call_id = body["messages"][-1]["content"]
        received[call_id] += 1
        if gate is not None:
            await gate.wait()
        else:
            await asyncio.sleep(0.005)  # long enough for calls to overlap
        return _completion(body["model"], call_id)

    return app


def _completion(model: str, call_id: str) -> dict:
    return {"model": model, "choices": [{"message": {"role": "assistant", "content": f"answer to {call_id}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def _upstream() -> Upstream:
    return Upstream(timeout_s=10, api_key=None, max_tokens=16, temperature=0.0, failure_threshold=3, reset_s=30,
                    max_connections=LIMIT)


async def _call(upstream: Upstream, url: str, call_id: str) -> str:
    completion = await upstream.complete([("control", Target(url, "m"))], [{"role": "user", "content": call_id}])
    return completion.answer


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):  # a bound on waiting, not a timing under test
        while not condition():
            await asyncio.sleep(0.01)


async def test_never_more_connections_than_the_limit_under_100_concurrent_calls():
    connections, received = _Connections(), Counter()
    async with _serve(_chat_app(received), connections) as url:
        upstream = _upstream()
        try:
            answers = await asyncio.gather(*(_call(upstream, url, f"call-{n}") for n in range(100)))
        finally:
            await upstream.aclose()
    assert answers == [f"answer to call-{n}" for n in range(100)]
    assert received == Counter({f"call-{n}": 1 for n in range(100)})
    assert connections.peak <= LIMIT
    assert connections.total <= LIMIT  # kept alive and reused, not reopened


async def test_cancelled_calls_close_their_connections_and_free_the_pool():
    connections, received, gate = _Connections(), Counter(), asyncio.Event()
    async with _serve(_chat_app(received, gate), connections) as url:
        upstream = _upstream()
        gc.collect()  # earlier tests' garbage is not this test's to report
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                hanging = [asyncio.create_task(_call(upstream, url, f"hang-{n}")) for n in range(LIMIT)]
                await _until(lambda: sum(received.values()) == LIMIT)  # all LIMIT connections in use
                for call in hanging:
                    call.cancel()
                await asyncio.gather(*hanging, return_exceptions=True)
                await _until(lambda: connections.open == 0)  # each cancelled call closed its connection
                gate.set()
                # Had the cancelled calls kept their slots, these would wait for the pool and time out.
                answers = await asyncio.gather(*(_call(upstream, url, f"call-{n}") for n in range(20)))
                open_after = connections.open
            finally:
                await upstream.aclose()
            gc.collect()
    assert all(call.cancelled() for call in hanging)
    assert answers == [f"answer to call-{n}" for n in range(20)]
    assert open_after <= LIMIT and connections.peak <= LIMIT
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert [message for message in leaked if "socket" in message or "transport" in message] == []


async def test_a_post_the_server_took_is_not_sent_again_when_it_hangs_up():
    received: Counter = Counter()

    async def answer_once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The first request on a connection is answered with keep-alive; the second is read in full
        # and then the server hangs up without a word, as a server that crashed on it would.
        answered = False
        while True:
            try:
                body = json.loads(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            call_id = body["messages"][-1]["content"]
            received[call_id] += 1
            if answered:
                break
            payload = json.dumps(_completion(body["model"], call_id)).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
            answered = True
        writer.close()

    server, base = await serve_raw(answer_once_per_connection)
    async with server:
        upstream = _upstream()
        try:
            first = await _call(upstream, base + "/v1", "call-1")
            with pytest.raises(AllArmsFailed) as failed:
                await _call(upstream, base + "/v1", "call-2")
        finally:
            await upstream.aclose()
    assert first == "answer to call-1"
    assert not failed.value.timed_out  # it failed on the hang-up, not by waiting
    assert received == Counter({"call-1": 1, "call-2": 1})


async def test_a_kept_alive_connection_the_server_closed_while_idle_is_not_used():
    connections, received = _Connections(), Counter()
    async with _serve(_chat_app(received), connections, timeout_keep_alive=0.05) as url:
        upstream = _upstream()
        try:
            answers = []
            for n in range(3):
                answers.append(await _call(upstream, url, f"call-{n}"))
                await _until(lambda: connections.open == 0)  # uvicorn hung up the idle connection
        finally:
            await upstream.aclose()
    assert answers == [f"answer to call-{n}" for n in range(3)]
    assert received == Counter({f"call-{n}": 1 for n in range(3)})
    assert connections.total == 3
