"""Automatic answer scores (`answer_scores`): which logged answers still need one, and storing them.

The sample is drawn in Python over event ids ordered by a seeded hash, so it is the same on SQLite
and PostgreSQL, the same for a seed, and stable as traffic grows: a later run continues down the
same random order instead of reshuffling it.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from store.db import Database
from store.models import AnswerScore, SearchEvent, new_id, utcnow

ARMS = ("control", "candidate")
METHODS = ("grounding", "judge")
_CHUNK = 500  # ids per IN (...) clause: far below SQLite's and PostgreSQL's parameter limits


@dataclass(frozen=True)
class ScoringInput:
    event_id: str
    arm: str  # assigned arm: scores are analysed by intention to treat, like every other metric
    query: str
    answer: str
    messages: list[dict[str, Any]]


def events_to_score(db: Database, experiment_id: str, method: str, per_arm: int, seed: int = 0) -> list[ScoringInput]:
    """Up to `per_arm` answered, unscored events per assigned arm, sampled at random (deterministic for a seed).

    Fallback events are included: the candidate arm owns them even though control answered.
    """
    _check_method(method)
    if per_arm <= 0:
        return []
    already = exists().where(AnswerScore.event_id == SearchEvent.id, AnswerScore.method == method)
    with db.session() as session:
        eligible = session.execute(
            select(SearchEvent.id, SearchEvent.arm)
            .where(
                SearchEvent.experiment_id == experiment_id,
                SearchEvent.arm.in_(ARMS),
                SearchEvent.status != "error",
                SearchEvent.answer.is_not(None),
                func.trim(SearchEvent.answer) != "",
                ~already,
            )
            .execution_options(yield_per=10_000)  # streamed: a long experiment need not fit in memory
        )
        chosen = _lowest_ranks(eligible, per_arm, seed)
        rows = []
        for chunk in _chunks(chosen):
            rows.extend(session.execute(
                select(SearchEvent.id, SearchEvent.arm, SearchEvent.query, SearchEvent.answer, SearchEvent.messages)
                .where(SearchEvent.id.in_(chunk))
            ).all())
    by_id = {row.id: ScoringInput(row.id, row.arm, row.query, row.answer, list(row.messages or [])) for row in rows}
    return [by_id[event_id] for event_id in chosen if event_id in by_id]


def save_scores(db: Database, rows: Iterable[tuple[str, str, float, dict[str, Any] | None]]) -> int:
    """Store (event_id, method, score, detail) rows; returns how many were new.

    Idempotent: an (event_id, method) already stored, by an earlier run or by a concurrent one, is
    skipped. An unknown event id is a bug in the caller and still raises.
    """
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    for event_id, method, score, detail in rows:
        _check_method(method)
        value = float(score)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"score for event {event_id} ({method}) must be in [0, 1], got {score!r}")
        pending.setdefault((event_id, method), {"event_id": event_id, "method": method, "score": value,
                                                "detail": detail})
    if not pending:
        return 0
    written = 0
    with db.session() as session:
        stored = _stored_pairs(session, list(pending))
        for key, values in pending.items():
            if key not in stored:
                written += _insert_if_absent(session, values)
    return written


def scores_by_event(db: Database, experiment_id: str, method: str) -> dict[str, float]:
    """event id -> score for one experiment and method (join `search_events` for the arm)."""
    _check_method(method)
    with db.session() as session:
        rows = session.execute(
            select(AnswerScore.event_id, AnswerScore.score)
            .join(SearchEvent, SearchEvent.id == AnswerScore.event_id)
            .where(SearchEvent.experiment_id == experiment_id, AnswerScore.method == method)
        ).all()
    return {event_id: float(score) for event_id, score in rows}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; expected one of {METHODS}")


def _lowest_ranks(rows: Iterable[tuple[str, str]], per_arm: int, seed: int) -> list[str]:
    """Per arm, the `per_arm` ids of lowest seeded hash, in that order; memory bounded by the sample."""
    heaps: dict[str, list[tuple[int, str]]] = {arm: [] for arm in ARMS}
    for event_id, arm in rows:
        heap = heaps[arm]
        entry = (-_rank(seed, event_id), event_id)  # a max-heap of the lowest ranks seen so far
        if len(heap) < per_arm:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    return [event_id for arm in ARMS for _, event_id in sorted(heaps[arm], reverse=True)]


def _rank(seed: int, event_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{event_id}".encode()).digest(), "big")


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _stored_pairs(session: Session, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    stored: set[tuple[str, str]] = set()
    for chunk in _chunks(sorted({event_id for event_id, _ in keys})):
        stored.update(session.execute(
            select(AnswerScore.event_id, AnswerScore.method).where(AnswerScore.event_id.in_(chunk))
        ).tuples())
    return stored


def _insert_if_absent(session: Session, values: dict[str, Any]) -> int:
    """Insert one score unless its (event_id, method) exists; 1 if written.

    The pre-check in save_scores makes a conflict rare; ON CONFLICT DO NOTHING covers a concurrent
    writer between that check and this insert (both backends we support speak it).
    """
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = (
        insert(AnswerScore)
        .values(id=new_id(), created_at=utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["event_id", "method"])
        .returning(AnswerScore.id)  # rowcount is not reported for INSERT on psycopg; a returned row is
    )
    return 0 if session.execute(statement).first() is None else 1
