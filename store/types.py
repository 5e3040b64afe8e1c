"""Column types the schema shares across SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime
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
