from pathlib import Path

import pytest

from store.db import Database


@pytest.fixture(autouse=True)
def _flows_on_the_test_server(prefect_server) -> None:
    """Every flow test runs against the process's temporary Prefect server (tests/conftest.py)."""


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Database:
    """A migrated SQLite store of the test's own, and everything a flow writes under the test's directory."""
    db = Database(f"sqlite:///{tmp_path / 'flows.db'}")
    db.migrate()
    monkeypatch.setenv("DATABASE_URL", db.url)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
    return db
