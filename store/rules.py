"""Rules from users' corrections: the queries. What the rules are is worked out in `training.rules`.

A rule is proposed with the feedback ids that support it; an operator approves or rejects it
once. Approved rules go into the next prompt template version (`training.tuning`): instructions
into its system prompt, output rules (banned phrases, required formats) as data the proxy applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from store.db import Database
from store.models import Feedback, Rule, SearchEvent, utcnow
from store.prompts import BANNED_PHRASE, REQUIRED_FORMAT

PROPOSED, APPROVED, REJECTED = "proposed", "approved", "rejected"
STATUSES = (PROPOSED, APPROVED, REJECTED)
INSTRUCTION = "instruction"
KINDS = (INSTRUCTION, BANNED_PHRASE, REQUIRED_FORMAT)
OUTPUT_KINDS = (BANNED_PHRASE, REQUIRED_FORMAT)


class RuleNotFound(LookupError):
    pass


class RuleAlreadyDecided(RuntimeError):
    pass


@dataclass(frozen=True)
class Correction:
    """One corrected answer, with what the proxy sent and got back."""

    feedback_id: str
    event_id: str
    answer: str
    corrected: str
    messages: list[dict[str, Any]]
    user_id: str | None


def corrections(db: Database, since: datetime | None = None) -> list[Correction]:
    """Feedback rows with a corrected answer on an answered event, oldest first."""
    query = (
        select(Feedback.id, SearchEvent.id, SearchEvent.answer, Feedback.corrected_answer, SearchEvent.messages,
               SearchEvent.user_id)
        .join(SearchEvent, SearchEvent.id == Feedback.event_id)
        .where(Feedback.corrected_answer.is_not(None), SearchEvent.answer.is_not(None))
        .order_by(Feedback.ts, Feedback.id)
    )
    if since is not None:
        query = query.where(Feedback.ts >= since)
    with db.session() as session:
        return [Correction(*row) for row in session.execute(query)]


def propose(db: Database, proposals: Iterable[tuple[str, str, Sequence[str]]]) -> dict[str, int]:
    """Store (kind, text, feedback ids) proposals; returns how many rules were created and updated.

    Idempotent: a rule with the same kind and text is never duplicated, whatever its status;
    new supporting feedback ids are added to it.
    """
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    with db.session() as session:
        for kind, text, feedback_ids in proposals:
            if kind not in KINDS:
                raise ValueError(f"unknown rule kind {kind!r}")
            rule = session.scalars(select(Rule).where(Rule.kind == kind, Rule.text == text)).first()
            if rule is None:
                session.add(Rule(kind=kind, text=text, status=PROPOSED, feedback_ids=sorted(set(feedback_ids)),
                                 created_at=utcnow()))
                counts["created"] += 1
                continue
            merged = sorted(set(rule.feedback_ids or []) | set(feedback_ids))
            if merged == sorted(rule.feedback_ids or []):
                counts["unchanged"] += 1
            else:
                rule.feedback_ids = merged  # a new list: JSON columns only notice reassignment
                counts["updated"] += 1
    return counts


def list_rules(db: Database, status: str | None = None) -> list[Rule]:
    """Newest first; all of them, or those with `status`."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown rule status {status!r}")
    query = select(Rule).order_by(Rule.created_at.desc(), Rule.id)
    if status is not None:
        query = query.where(Rule.status == status)
    with db.session() as session:
        return list(session.scalars(query))


def approved(db: Database) -> list[Rule]:
    """Approved rules in the order they were proposed, so a prompt built from them is stable."""
    with db.session() as session:
        return list(session.scalars(select(Rule).where(Rule.status == APPROVED).order_by(Rule.created_at, Rule.id)))


def decide(db: Database, rule_id: str, status: str) -> Rule:
    """Approve or reject a proposed rule; a decision is made once."""
    if status not in (APPROVED, REJECTED):
        raise ValueError(f"a decision is {APPROVED} or {REJECTED}, not {status!r}")
    with db.session() as session:
        # A conditional update, so two operators deciding at once cannot both win.
        changed = session.execute(
            update(Rule).where(Rule.id == rule_id, Rule.status == PROPOSED).values(status=status, decided_at=utcnow())
        ).rowcount
        rule = session.get(Rule, rule_id, populate_existing=True)
        if rule is None:
            raise RuleNotFound(f"unknown rule {rule_id!r}")
        if not changed:
            raise RuleAlreadyDecided(f"rule {rule_id} is already {rule.status}")
        return rule
