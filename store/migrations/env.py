"""Alembic environment: runs on the connection that `Database.migrate` hands over."""

from alembic import context
from sqlalchemy import create_engine

from store.db import normalize_url
from store.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic upgrade` from the command line
        url = normalize_url(config.get_main_option("sqlalchemy.url"))
        with create_engine(url).begin() as connection:
            _migrate(connection)
    else:
        _migrate(connection)


def _migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
