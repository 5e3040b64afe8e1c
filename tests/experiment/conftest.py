"""The store fixtures (SQLite and the real PostgreSQL) for the experiment engine's tests."""

from __future__ import annotations

import pytest

from store.db import Database
from tests.store.conftest import backend, db, db_url, empty_db, pg_admin, pg_url  # noqa: F401


@pytest.fixture
def sqlite_db(tmp_path) -> Database:
    """SQLite only, for tests that write thousands of rows and test arithmetic, not the backend."""
    database = Database(f"sqlite:///{tmp_path / 'experiment.db'}")
    database.migrate()
    return database
