"""Engine, sessions and migrations for SQLite (default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, Insert, Table, create_engine, event, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from store.flock import exclusive

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# One lock per schema (tests and tenants may share a database); held until the upgrade commits.
_PG_MIGRATE_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('abloop.migrate:' || coalesce(current_schema(), '')))")


def normalize_url(url: str) -> str:
    """Accept the usual `postgresql://` and `postgres://` spellings and use psycopg 3 for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _on_sqlite_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the proxy's experiment refresh) run beside the writer.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    # A dropped-packet outage would otherwise block each connection attempt for minutes.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args={"connect_timeout": 5})


def insert_ignoring(dialect: str, table: Table, conflict: Sequence[str] = ("id",)) -> Insert:
    """`INSERT .. ON CONFLICT (conflict) DO NOTHING`: a repeated or concurrent insert is a no-op.

    Both supported databases speak it; another dialect gets a plain INSERT.
    """
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(conflict))
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(conflict))
    return insert(table)


class Database:
    """One engine and its session factory. Cheap to create; connects lazily."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision; safe when many replicas start at once.

        Concurrent callers take turns: the first upgrades, the others then find the schema current.
        PostgreSQL: a transaction-level advisory lock (per schema) held by the upgrade's own
        transaction, so it is released by the commit or by a crash. SQLite: an exclusive `flock`
        on `<database>.migrate.lock` beside the file (one host, which is all SQLite can serve).
        """
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._migration_lock(), self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(_PG_MIGRATE_LOCK)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """The file lock that serialises migrations of one SQLite file; nothing on other databases."""
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            yield
            return
        path = Path(f"{database}.migrate.lock")
        if not path.parent.is_dir():  # the database cannot be opened either: let the engine say so
            yield
            return
        with exclusive(path):
            yield

    def dispose(self) -> None:
        self.engine.dispose()
