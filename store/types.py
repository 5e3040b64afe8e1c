"""Column types the schema shares across SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back time-zone aware, in UTC, on either database.

    Underneath it is `DateTime(timezone=True)`, the type the migrations create, so the schema does
    not change. PostgreSQL stores it as `timestamptz` (handed back in the session's time zone:
    converted to UTC here); SQLite has no time zones, so it stores the UTC wall time and hands it
    back naive: UTC is attached here. A naive value written or compared is taken as UTC, the
    convention every writer of this store follows.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if not isinstance(value, datetime):
            return value  # None, or a value the underlying type judges (a date, a string on PostgreSQL)
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite's DATETIME writes the wall time and drops the offset: make sure it is UTC's.
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class epoch_microseconds(FunctionElement[int]):  # lower case: it reads as SQLAlchemy's `func.*` do
    """A `UTCDateTime` column as whole microseconds since the epoch, computed by the database: exact on both, and
    a million timestamps come back as integers rather than as datetimes made aware one by one (2.6 s in Python)."""

    type = BigInteger()
    inherit_cache = True


@compiles(epoch_microseconds, "postgresql")
def _epoch_microseconds_postgresql(element: epoch_microseconds, compiler, **kw) -> str:
    # extract(epoch) is numeric, exact to the microsecond, from PostgreSQL 14 on (double before: round() mends it).
    return f"CAST(round(extract(epoch FROM {compiler.process(element.clauses, **kw)}) * 1000000) AS BIGINT)"


@compiles(epoch_microseconds, "sqlite")
def _epoch_microseconds_sqlite(element: epoch_microseconds, compiler, **kw) -> str:
    # SQLite holds SQLAlchemy's 'YYYY-MM-DD HH:MM:SS.ffffff' of the UTC wall time (UTCDateTime): the whole seconds
    # by strftime from the first 19 characters (given the fraction, it rounds .9995 and up to the next second), the
    # six digits after the point as they are ('' where a writer left them out: 0).
    column = compiler.process(element.clauses, **kw)
    return (f"(CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER) * 1000000"
            f" + CAST(substr({column}, 21, 6) AS INTEGER))")
