"""Store fixtures: a fresh database per test on SQLite and on the real PostgreSQL.

PostgreSQL tests get their own schema (search_path set through the URL) and drop it afterwards.
If PostgreSQL is unreachable they fail, unless ABLOOP_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from store.db import Database, normalize_url
from store.models import new_id, utcnow
from store.writer import EventWriter
from tests.conftest import POSTGRES_URL, free_port

SKIP_POSTGRES = os.environ.get("ABLOOP_SKIP_POSTGRES") == "1"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_admin():
    """An engine on the test PostgreSQL database, for creating and dropping schemas."""
    if SKIP_POSTGRES:
        pytest.skip("ABLOOP_SKIP_POSTGRES=1")
    engine = create_engine(normalize_url(POSTGRES_URL), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {POSTGRES_URL}: {exc}. Start it "
            "(pg_ctlcluster --skip-systemctl-redirect <version> main start) or set ABLOOP_SKIP_POSTGRES=1.",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def _with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_admin) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL schema; dropped after the test."""
    schema = f"abloop_t_{uuid.uuid4().hex[:12]}"
    with pg_admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _with_search_path(POSTGRES_URL, schema)
    finally:
        with pg_admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request, tmp_path: Path) -> str:
    if backend == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def empty_db(db_url: str) -> Iterator[Database]:
    """A database with no tables yet."""
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def db(empty_db: Database) -> Database:
    """A migrated database."""
    empty_db.migrate()
    return empty_db


@pytest.fixture
def dead_db(backend: str, tmp_path: Path) -> Iterator[Database]:
    """A database that cannot be reached: a closed port (PostgreSQL), a path that cannot exist (SQLite)."""
    if backend == "postgres":
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"
    else:
        url = f"sqlite:///{tmp_path / 'missing-dir' / 'nested' / 'store.db'}"
    database = Database(url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
async def make_writer(tmp_path: Path):
    """Build EventWriters with test-friendly timings; every one is stopped at the end of the test."""
    writers: list[EventWriter] = []

    def make(database: Database, spool_dir: Path | None = None, **overrides: Any) -> EventWriter:
        options: dict[str, Any] = {
            "flush_interval_s": 0.01,
            "max_retries": 1,
            "backoff_s": 0.01,
            "replay_interval_s": 0.05,
        }
        options.update(overrides)
        writer = EventWriter(database, spool_dir or tmp_path / "spool", **options)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        await writer.stop()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): a claim named with it belongs to nobody."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def add_experiment(db: Database, **overrides: Any) -> str:
    """An `experiments` row written as it is (a running control-only experiment unless overridden); its id."""
    from store.models import Experiment

    row = Experiment(**{"control_base_url": "http://control.test/v1", "control_model": "m", "salt": "s",
                        "status": "running", **overrides})  # fmt: skip
    with db.session() as session:
        session.add(row)
        session.flush()
        return row.id


def event_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": new_id(),
        "ts": utcnow(),
        "user_id": "user-1",
        "session_id": None,
        "experiment_id": "exp-1",
        "arm": "control",
        "served_arm": "control",
        "model": "model-a",
        "query": "what is a list comprehension?",
        "messages": [{"role": "user", "content": "what is a list comprehension?"}],
        "retrieved": {"ids": ["doc-1"], "scores": [0.5], "index_version": "v1"},
        "prompt_template_id": None,
        "prompt_template_version": None,
        "answer": "a compact loop",
        "status": "ok",
        "error": None,
        "timings": {"retrieval": 1.0, "llm": 2.0, "total": 3.0},
        "tokens_in": 10,
        "tokens_out": 5,
    }
    row.update(overrides)
    return row


def feedback_row(event_id: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": new_id(),
        "event_id": event_id,
        "ts": utcnow(),
        "rating": 5,
        "thumbs": "up",
        "corrected_answer": None,
        "comment": None,
    }
    row.update(overrides)
    return row


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
