"""Every timestamp comes back time-zone aware, in UTC, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import DateTime, func, select, text

from experiment.phases import microseconds
from store import experiments, prompts, rules
from store.db import Database
from store.models import (
    Adapter,
    AnswerScore,
    Base,
    Experiment,
    ExperimentEvent,
    Feedback,
    PromptTemplate,
    Rule,
    SearchEvent,
    new_id,
)
from store.types import UTCDateTime, epoch_microseconds
from tests.store.conftest import add_experiment, event_row, feedback_row

MOMENT = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
CET = timezone(timedelta(hours=1))


def test_every_datetime_column_is_utc_datetime() -> None:
    columns = {f"{table.name}.{column.name}": column.type for table in Base.metadata.sorted_tables
               for column in table.c if isinstance(getattr(column.type, "impl", column.type), DateTime)}
    assert {"search_events.ts", "feedback.ts", "experiments.started_at", "experiments.ended_at",
            "experiment_events.ts", "answer_scores.created_at", "prompt_templates.created_at", "rules.created_at",
            "rules.decided_at", "adapters.created_at"} <= set(columns)
    assert all(isinstance(kind, UTCDateTime) for kind in columns.values())


def test_rows_read_back_are_aware_utc(db: Database) -> None:
    event_id = new_id()
    experiment_id = add_experiment(db, started_at=MOMENT.replace(tzinfo=None), ended_at=MOMENT)  # naive: as UTC
    with db.session() as session:
        session.add(SearchEvent(**event_row(id=event_id, ts=MOMENT)))
        session.flush()
        session.add(Feedback(**feedback_row(event_id, ts=MOMENT.astimezone(CET))))  # the same instant, in CET
        session.add(ExperimentEvent(experiment_id=experiment_id, ts=MOMENT, kind="start"))
        session.add(AnswerScore(event_id=event_id, method="grounding", score=0.5, created_at=MOMENT))
        session.add(Adapter(name="a-v1", base_model="b", path="/p", created_at=MOMENT))
        session.add(Rule(kind="instruction", text="Be brief.", created_at=MOMENT, decided_at=MOMENT))
    prompts.active(db)  # created_at by the column default
    rules.propose(db, [("banned_phrase", "As an AI,", [])])

    with db.session() as session:
        read = [
            session.scalar(select(SearchEvent.ts)), session.scalar(select(Feedback.ts)),
            *session.execute(select(Experiment.started_at, Experiment.ended_at)).one(),
            session.scalar(select(ExperimentEvent.ts)), session.scalar(select(AnswerScore.created_at)),
            session.scalar(select(Adapter.created_at)),
            *session.execute(select(Rule.created_at, Rule.decided_at).where(Rule.kind == "instruction")).one(),
            session.scalar(select(func.max(SearchEvent.ts))),  # an aggregate keeps the column's type
        ]
        created = [session.scalar(select(PromptTemplate.created_at)),
                   session.scalar(select(Rule.created_at).where(Rule.kind == "banned_phrase"))]
    assert all(value.tzinfo is UTC for value in read + created), read + created
    assert read == [MOMENT] * len(read)
    assert all(abs(datetime.now(UTC) - value) < timedelta(hours=1) for value in created)
    assert experiments.get(db, experiment_id).started_at.tzinfo is UTC


def test_comparisons_bind_the_same_instant_in_any_zone(db: Database) -> None:
    with db.session() as session:
        session.add(SearchEvent(**event_row(ts=MOMENT)))
    for bound in (MOMENT, MOMENT.astimezone(CET), MOMENT.replace(tzinfo=None)):
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(SearchEvent).where(SearchEvent.ts == bound)) == 1
            assert session.scalar(select(func.count()).where(SearchEvent.ts > bound - timedelta(microseconds=1))) == 1


@pytest.mark.postgres
def test_a_postgresql_session_in_another_time_zone_still_reads_utc(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add(SearchEvent(**event_row(ts=MOMENT)))
        with db.engine.begin() as connection:
            connection.execute(text("SET LOCAL TIME ZONE 'Europe/Berlin'"))
            [raw] = connection.execute(text("SELECT ts FROM search_events")).one()
            [ts] = connection.execute(select(SearchEvent.ts)).one()
    finally:
        db.dispose()
    assert raw.utcoffset() == timedelta(hours=1)  # what psycopg hands over in that session
    assert ts == MOMENT and ts.tzinfo is UTC


def test_epoch_microseconds_is_exact_on_either_backend(db: Database) -> None:
    """The database's count agrees with phases.microseconds, which experiment.collect cuts the same rows by.

    .9995 s and up is where SQLite's strftime would round to the next second, given the fraction."""
    moments = [MOMENT, MOMENT.replace(microsecond=0), MOMENT.replace(microsecond=999_720),
               MOMENT.replace(microsecond=999_999), MOMENT.astimezone(CET).replace(microsecond=1)]
    with db.session() as session:
        for moment in moments:
            session.add(SearchEvent(**event_row(ts=moment)))
    with db.session() as session:
        read = session.execute(select(SearchEvent.ts, epoch_microseconds(SearchEvent.ts))).all()
    assert sorted(value for _ts, value in read) == sorted(microseconds(moment) for moment in moments)
    assert all(value == microseconds(ts) for ts, value in read)


@pytest.mark.postgres
def test_a_postgresql_session_in_another_time_zone_writes_the_same_instant(pg_url: str) -> None:
    """A naive value is UTC, whatever the session's zone: it must reach PostgreSQL with its offset."""
    berlin = Database(pg_url + "%20-ctimezone%3DEurope%2FBerlin")  # appended to the URL's options=-csearch_path…
    try:
        berlin.migrate()
        with berlin.session() as session:
            session.add(SearchEvent(**event_row(ts=MOMENT)))
            session.add(SearchEvent(**event_row(ts=MOMENT.replace(tzinfo=None))))
        with berlin.engine.begin() as connection:
            zone = connection.execute(text("SHOW TIME ZONE")).scalar()
            stored = connection.execute(text("SELECT ts AT TIME ZONE 'UTC' FROM search_events")).scalars().all()
    finally:
        berlin.dispose()
    assert zone == "Europe/Berlin"
    assert stored == [MOMENT.replace(tzinfo=None)] * 2
