"""Events written while the real PostgreSQL is unreachable arrive once it is back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from store.db import normalize_url
from store.models import Feedback, SearchEvent
from tests.conftest import POSTGRES_URL, free_port
from tests.proxy.conftest import make_settings, running_proxy

pytestmark = pytest.mark.postgres


class TcpGate:
    """A loopback TCP forwarder in front of PostgreSQL that a test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut the live ones, as a database outage would."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not listener:  # closed while we were accepting
                    client.close()
                    return
                upstream = socket.create_connection(self.target)
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def pg_schema():
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(normalize_url(POSTGRES_URL))
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def _count(schema: str) -> int:
    return len(_rows(schema, SearchEvent))


def _rows(schema: str, model) -> list:
    engine = create_engine(normalize_url(POSTGRES_URL) + f"?options=-csearch_path%3D{schema}")
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(model.__table__)))
    finally:
        engine.dispose()


def test_events_during_a_database_outage_arrive_after_it_returns(tmp_path, pg_schema, control_upstream):
    gate = TcpGate(("127.0.0.1", 5432))
    gate.open()
    database_url = f"postgresql://postgres@127.0.0.1:{gate.port}/test?options=-csearch_path%3D{pg_schema}"
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], database_url=database_url)
    with running_proxy(settings) as (url, app), httpx.Client(timeout=30) as client:
        writer = app.state.abloop.writer

        def search(n: int, tag: str) -> list[str]:
            ids = []
            for i in range(n):
                response = client.post(f"{url}/api/v1/search", json={"query": f"{tag} {i}", "user_id": f"u{i}"})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])
            return ids

        search(5, "before")
        _wait(lambda: _count(pg_schema) == 5)

        gate.close()
        during = search(40, "during")
        # Feedback on an event that only exists in the spool is still accepted.
        accepted = client.post(f"{url}/api/v1/feedback", json={"request_id": during[0], "thumbs": "up"})
        assert accepted.status_code == 201
        _wait(lambda: writer.spool_bytes > 0)
        assert _count(pg_schema) == 5
        assert all(writer.is_pending(i) for i in during)
        metrics = client.get(f"{url}/metrics").text
        assert "abloop_writer_spool_bytes" in metrics

        gate.open()
        _wait(lambda: _count(pg_schema) == 45, timeout=60)
        _wait(lambda: writer.spool_bytes == 0)
        assert not any(writer.is_pending(i) for i in during)
    gate.close()
    assert _count(pg_schema) == 45
    # The feedback accepted during the outage is a row now, on the event it was about.
    assert [(row.event_id, row.thumbs) for row in _rows(pg_schema, Feedback)] == [(during[0], "up")]


def test_text_postgresql_cannot_hold_is_stored_marked_never_dropped(tmp_path, pg_schema, control_upstream):
    database_url = f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{pg_schema}"
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], database_url=database_url)
    with running_proxy(settings) as (url, app), httpx.Client(timeout=30) as client:
        searched = client.post(f"{url}/api/v1/search", json={"query": "nul \u0000 inside", "user_id": "u\u0000x"})
        assert searched.status_code == 200, searched.text
        request_id = searched.json()["request_id"]
        rated = client.post(f"{url}/api/v1/feedback",
                            json={"request_id": request_id, "thumbs": "down", "comment": "bad \u0000 answer"})
        forged = client.post(f"{url}/api/v1/feedback", json={"request_id": "x\u0000y", "thumbs": "up"})
        assert rated.status_code == 201 and forged.status_code == 404  # never a store error
        _wait(lambda: _count(pg_schema) == 1 and len(_rows(pg_schema, Feedback)) == 1)
        assert not list((tmp_path / "spool").rglob("*rejected*/*"))
    [event] = _rows(pg_schema, SearchEvent)
    assert event.id == request_id and "\x00" not in event.query and "query" in event.timings["sanitized"]
    [feedback] = _rows(pg_schema, Feedback)
    assert feedback.event_id == request_id and feedback.thumbs == "down" and "\x00" not in feedback.comment


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)
