"""Experiment rows and their transitions: the queries. The life cycle that changes them is `experiment.lifecycle`.

The store holds the truth; proxies read the running experiment every few seconds.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.config import Settings
from store.db import Database
from store.models import Experiment, ExperimentEvent, utcnow

RUNNING = "running"


class ExperimentNotFound(LookupError):
    pass


def new_salt() -> str:
    return secrets.token_hex(8)


def get_running(db: Database) -> Experiment | None:
    """The running experiment; if replicas raced to create several, the oldest wins."""
    with db.session() as session:
        return session.scalars(
            select(Experiment).where(Experiment.status == RUNNING).order_by(Experiment.started_at, Experiment.id)
        ).first()


def get(db: Database, experiment_id: str) -> Experiment:
    with db.session() as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            raise ExperimentNotFound(f"unknown experiment {experiment_id!r}")
        return experiment


def lock_running(session: Session, experiment_id: str) -> bool:
    """Hold the experiment's row for the caller's transaction if it is running; False if it is not (or is unknown).

    A conditional write, not a read, so that two changes of one experiment cannot both find it running: on
    PostgreSQL the UPDATE holds the row lock until commit, and a concurrent one waits for it and then checks the
    status again as committed; on SQLite (pysqlite begins a transaction only at its first write) it takes the
    database's write lock at once, so the check and everything after it commit as one serialised transaction.
    """
    claimed = session.execute(
        update(Experiment).where(Experiment.id == experiment_id, Experiment.status == RUNNING)
        .values(status=Experiment.status).execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1


def ensure_running(db: Database, settings: Settings) -> Experiment:
    """Return the running experiment, seeding the first one from the environment."""
    existing = get_running(db)
    if existing is not None:
        return existing
    with db.session() as session:
        seeded = Experiment(
            control_base_url=settings.llm_api_base,
            control_model=settings.llm_model,
            candidate_base_url=settings.llm_api_base_new_model,
            candidate_model=(settings.llm_model_new or settings.llm_model) if settings.llm_api_base_new_model else None,
            candidate_share=settings.candidate_share,
            salt=new_salt(),
            status=RUNNING,
        )
        session.add(seeded)
        session.flush()
        add_event(session, seeded, "start", to_share=seeded.candidate_share, reason="seeded from the environment")
    winner = get_running(db)
    _stop_others(db, keep=winner)
    return winner


def _stop_others(db: Database, keep: Experiment) -> None:
    # Only newer ones: replicas that raced may have seen different winners, and stopping older
    # ones too could leave none running. The oldest is never stopped, every newer one is.
    with db.session() as session:
        for other in session.scalars(
            select(Experiment).where(Experiment.status == RUNNING, Experiment.id != keep.id)
        ):
            if (other.started_at, other.id) < (keep.started_at, keep.id):
                continue
            other.status = "stopped"
            other.ended_at = utcnow()
            other.decision = {"reason": "duplicate experiment created by a concurrent replica start"}
            add_event(session, other, "stopped", reason=other.decision["reason"])


def add_event(
    session: Session,
    experiment: Experiment,
    kind: str,
    *,
    from_share: float | None = None,
    to_share: float | None = None,
    reason: str = "",
    analysis: dict[str, Any] | None = None,
) -> ExperimentEvent:
    """Record a transition in the caller's transaction, so the change and its reason commit together."""
    event = ExperimentEvent(experiment_id=experiment.id, ts=utcnow(), kind=kind, from_share=from_share,
                            to_share=to_share, reason=reason, analysis=analysis)
    session.add(event)
    return event


def list_events(db: Database, experiment_id: str) -> list[ExperimentEvent]:
    """Every transition of an experiment, oldest first."""
    with db.session() as session:
        return events_in(session, experiment_id)


def events_in(session: Session, experiment_id: str) -> list[ExperimentEvent]:
    """`list_events` in the caller's transaction (one that holds the experiment sees its latest transitions)."""
    return list(session.scalars(
        select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment_id)
        .order_by(ExperimentEvent.ts, ExperimentEvent.id)
    ))


def list_experiments(db: Database, limit: int = 20) -> list[Experiment]:
    """The newest experiments first."""
    with db.session() as session:
        return list(session.scalars(select(Experiment).order_by(Experiment.started_at.desc()).limit(limit)))
