"""Small read helpers over the logged events, for the proxy and the flows."""

from __future__ import annotations

from sqlalchemy import func, select

from store.db import Database
from store.models import Feedback, SearchEvent


def event_exists(db: Database, event_id: str) -> bool:
    with db.session() as session:
        return session.scalar(select(SearchEvent.id).where(SearchEvent.id == event_id)) is not None


def count_events(db: Database, experiment_id: str | None = None) -> int:
    query = select(func.count()).select_from(SearchEvent)
    if experiment_id is not None:
        query = query.where(SearchEvent.experiment_id == experiment_id)
    with db.session() as session:
        return int(session.scalar(query) or 0)


def count_feedback(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Feedback)) or 0)
