"""The experiment lifecycle. The store holds the truth; proxies read it every few seconds."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select

from store.config import Settings
from store.db import Database
from store.models import Experiment, utcnow

RUNNING = "running"


class ExperimentNotFound(LookupError):
    pass


class ExperimentNotRunning(RuntimeError):
    pass


class NoPromoteDecision(RuntimeError):
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


def ensure_running(db: Database, settings: Settings) -> Experiment:
    """Return the running experiment, seeding the first one from the environment."""
    existing = get_running(db)
    if existing is not None:
        return existing
    with db.session() as session:
        session.add(
            Experiment(
                control_base_url=settings.llm_api_base,
                control_model=settings.llm_model,
                candidate_base_url=settings.llm_api_base_new_model,
                candidate_model=(settings.llm_model_new or settings.llm_model)
                if settings.llm_api_base_new_model
                else None,
                candidate_share=settings.candidate_share,
                salt=new_salt(),
                status=RUNNING,
            )
        )
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


def _running_by_id(session, experiment_id: str) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise ExperimentNotFound(f"unknown experiment {experiment_id!r}")
    if experiment.status != RUNNING:
        raise ExperimentNotRunning(f"experiment {experiment_id} is {experiment.status}")
    return experiment


def set_share(db: Database, experiment_id: str, share: float) -> Experiment:
    """Change the split in place: same salt, so users only move in the direction of the change."""
    with db.session() as session:
        experiment = _running_by_id(session, experiment_id)
        experiment.candidate_share = share
        return experiment


def start_candidate(
    db: Database,
    *,
    base_url: str,
    model: str,
    adapter_id: str | None = None,
    share: float | None = None,
) -> Experiment:
    """A new candidate is a new experiment (new id, new salt); the control arm carries over."""
    current = get_running(db)
    if current is None:
        raise ExperimentNotFound("no running experiment")
    with db.session() as session:
        old = _running_by_id(session, current.id)
        old.status = "stopped"
        old.ended_at = utcnow()
        old.decision = {"reason": "replaced by a new candidate"}
        fresh = Experiment(
            control_base_url=old.control_base_url,
            control_model=old.control_model,
            control_adapter_id=old.control_adapter_id,
            candidate_base_url=base_url,
            candidate_model=model,
            candidate_adapter_id=adapter_id,
            candidate_share=old.candidate_share if share is None else share,
            salt=new_salt(),
            status=RUNNING,
        )
        session.add(fresh)
    return fresh


def conclude(
    db: Database, experiment_id: str, *, outcome: str, decision: dict[str, Any] | None = None
) -> Experiment:
    """End a running experiment as `promoted` or `rolled_back` and start its successor.

    Promoted: the candidate becomes control. Rolled back: control stays. Either way the
    successor has no candidate and a share of 0.
    """
    if outcome not in ("promoted", "rolled_back"):
        raise ValueError(f"unknown outcome {outcome!r}")
    with db.session() as session:
        old = _running_by_id(session, experiment_id)
        if outcome == "promoted" and not old.candidate_base_url:
            raise ExperimentNotRunning(f"experiment {experiment_id} has no candidate to promote")
        old.status = outcome
        old.ended_at = utcnow()
        old.decision = decision or {}
        if outcome == "promoted":
            control = (old.candidate_base_url, old.candidate_model, old.candidate_adapter_id)
        else:
            control = (old.control_base_url, old.control_model, old.control_adapter_id)
        fresh = Experiment(
            control_base_url=control[0],
            control_model=control[1],
            control_adapter_id=control[2],
            candidate_share=0.0,
            salt=new_salt(),
            status=RUNNING,
        )
        session.add(fresh)
    return fresh


def promote(db: Database, experiment_id: str, *, force: bool = False, via: str) -> Experiment:
    """Candidate becomes control, share back to 0; returns the successor experiment.

    Without `force` the experiment must carry a recorded "promote" decision (written by
    `abloop evaluate` or the evaluate_arms flow): a promotion is backed by numbers or by an
    operator who said so.
    """
    experiment = get(db, experiment_id)
    recorded = (experiment.decision or {}).get("action")
    if not force and recorded != "promote":
        raise NoPromoteDecision(
            f"experiment {experiment_id} has no recorded promote decision (recorded: {recorded!r}); "
            "run `abloop evaluate` first or force it"
        )
    decision = dict(experiment.decision or {}, forced=force, via=via)
    return conclude(db, experiment_id, outcome="promoted", decision=decision)
