"""What the proxy's shutdown must do: write what is still queued, stop what it started, close what it opened.

A deployment restarts replicas all day; events and feedback accepted just before a restart must reach the store.
The lifespan runs here in the test's own event loop, so what it leaves behind is there to be seen.
"""

from __future__ import annotations

import asyncio
import errno
import time

import httpx
import pytest
from sqlalchemy import func, select

from proxy.app import create_app
from retrieval.corpus import Document
from serving.stub import running_stub
from store.db import Database
from store.models import Feedback, SearchEvent
from tests.proxy.conftest import REDIS_URL, make_settings


@pytest.fixture(scope="module")
def index_documents():
    return [Document("Lists", "doc:lists", "A list is a mutable sequence. Use append to add an item to a list.")]


async def _eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_shutdown_writes_the_queue_stops_its_tasks_and_closes_its_connections(tmp_path, index_dir,
                                                                                     monkeypatch):
    # As a worker of `abloop proxy --workers N`: it also publishes its gauges on a timer.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    with running_stub(model="control-model", answer="control says hi") as (stub, upstream_url):
        # Nothing is written while the proxy runs: the writer's interval is an hour and its batch 10,000 rows.
        settings = make_settings(tmp_path, index_dir=index_dir, llm_api_base=upstream_url,
                                 writer_flush_interval_s=3600.0, writer_batch_size=10_000)
        app = create_app(settings)
        before = asyncio.all_tasks()
        async with app.router.lifespan_context(app):
            state = app.state.abloop
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
                searched = [await client.post("/api/v1/search", json={"query": f"what is a list {n}?",
                                                                        "user_id": f"user-{n}"}) for n in range(3)]
                assert [response.status_code for response in searched] == [200, 200, 200]
                ids = [response.json()["request_id"] for response in searched]
                thumbs = await client.post("/api/v1/feedback", json={"request_id": ids[0], "thumbs": "up"})
                assert thumbs.status_code == 201, thumbs.text
            assert all(state.writer.is_pending(event_id) for event_id in ids)  # still queued, not written
            assert stub.connections > 0  # the pool keeps its connection to the model server open
            assert state.retriever._batching is not None  # the query embedder was started by the searches
            assert state.db.engine.pool.checkedin() > 0
            assert not state.metrics._publishing.done()  # the worker's gauges are being published
        left_running = {task for task in asyncio.all_tasks() - before if not task.done()} - {asyncio.current_task()}
        # None left of the refresh loop, the writer's flusher, the embedder's batcher, the gauges' publisher.
        assert left_running == set()
        assert await _eventually(lambda: stub.connections == 0), "the upstream pool was not closed"
        assert state.db.engine.pool.checkedin() == 0  # the store's pooled connections closed

    db = Database(settings.database_url)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(SearchEvent)) == 3
        assert session.execute(select(Feedback.event_id, Feedback.thumbs)).all() == [(ids[0], "up")]
    db.dispose()


async def test_shutdown_closes_the_rate_limiters_redis_connection(tmp_path, index_dir, redis_prefix):
    server, prefix = redis_prefix
    with running_stub(model="control-model", answer="hi") as (_stub, upstream_url):
        settings = make_settings(tmp_path, index_dir=index_dir, llm_api_base=upstream_url, redis_url=REDIS_URL,
                                 rate_limit_key_prefix=prefix)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
                searched = await client.post("/api/v1/search", json={"query": "a list?", "user_id": "ursula"})
            assert searched.status_code == 200
            assert server.exists(prefix + "user:ursula")  # the limiter took its token in Redis
            connection = await app.state.abloop.rate_limiter._buckets._client.client_id()
            assert server.execute_command("CLIENT", "LIST", "ID", connection)
        assert await _eventually(lambda: not server.execute_command("CLIENT", "LIST", "ID", connection)), \
            "the rate limiter's Redis connection was left open"


async def test_a_failing_shutdown_step_still_writes_the_queue(tmp_path, index_dir, monkeypatch):
    # The gauges' clean-up meets a failing disk (PROMETHEUS_MULTIPROC_DIR read-only or gone): it runs before
    # the writer's stop, which must run all the same, or the queued events die with the process.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    import prometheus_client.multiprocess

    def failing_disk(*_args, **_kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(prometheus_client.multiprocess, "mark_process_dead", failing_disk)
    with running_stub(model="control-model", answer="hi") as (stub, upstream_url):
        settings = make_settings(tmp_path, index_dir=index_dir, llm_api_base=upstream_url,
                                 writer_flush_interval_s=3600.0, writer_batch_size=10_000)
        app = create_app(settings)
        with pytest.raises(OSError, match="Input/output error"):  # the failure is not hidden
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
                    searched = [await client.post("/api/v1/search", json={"query": f"a list {n}?",
                                                                            "user_id": f"user-{n}"}) for n in range(3)]
                assert [response.status_code for response in searched] == [200, 200, 200]
                state = app.state.abloop
        assert await _eventually(lambda: stub.connections == 0), "the steps after the failing one did not run"
    assert state.writer.queue_depth == 0
    db = Database(settings.database_url)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(SearchEvent)) == 3
    db.dispose()
