"""The schema every package shares. Table and column names are part of the contract (DESIGN.md)."""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from store.types import UTCDateTime

# Stable constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A UUIDv7 (RFC 9562): 74 random bits behind the Unix time in milliseconds, so an id also says when
    it was made (`id_time`) and new rows land at the end of an index."""
    millis = time.time_ns() // 1_000_000 & (1 << 48) - 1
    rand_a, rand_b = secrets.randbits(12), secrets.randbits(62)
    return str(uuid.UUID(int=millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b))


def id_time(value: str) -> datetime | None:
    """When a `new_id` was made; None for an id that is not a UUIDv7 (rows written before ids were v7)."""
    parsed = uuid.UUID(value)
    return datetime.fromtimestamp((parsed.int >> 80) / 1000, UTC) if parsed.version == 7 else None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # Every datetime column is UTCDateTime: aware UTC in Python on SQLite and PostgreSQL alike.
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class SearchEvent(Base):
    """One logged request: what was asked, what was sent upstream, what came back."""

    __tablename__ = "search_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[str | None] = mapped_column(String(256), index=True)
    session_id: Mapped[str | None] = mapped_column(String(256))
    experiment_id: Mapped[str | None] = mapped_column(String(36), index=True)
    arm: Mapped[str] = mapped_column(String(16))  # assigned arm
    served_arm: Mapped[str | None] = mapped_column(String(16))  # None when no arm answered
    model: Mapped[str | None] = mapped_column(String(256))
    query: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[Any]] = mapped_column(default=list)
    retrieved: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"ids","scores","index_version"}
    prompt_template_id: Mapped[str | None] = mapped_column(String(36))
    prompt_template_version: Mapped[int | None] = mapped_column(Integer)
    answer: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # ok | fallback | error
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"retrieval","llm","total"} in ms
    tokens_in: Mapped[int | None] = mapped_column(Integer)
    tokens_out: Mapped[int | None] = mapped_column(Integer)
    # The OpenTelemetry trace the request ran in (32 hex digits), from a bad rating to its trace; None untraced.
    trace_id: Mapped[str | None] = mapped_column(String(32))


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(ForeignKey("search_events.id"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    rating: Mapped[int | None] = mapped_column(Integer)
    thumbs: Mapped[str | None] = mapped_column(String(8))
    corrected_answer: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    control_base_url: Mapped[str] = mapped_column(String(1024))
    control_model: Mapped[str] = mapped_column(String(256))
    control_adapter_id: Mapped[str | None] = mapped_column(String(36))
    candidate_base_url: Mapped[str | None] = mapped_column(String(1024))
    candidate_model: Mapped[str | None] = mapped_column(String(256))
    candidate_adapter_id: Mapped[str | None] = mapped_column(String(36))
    candidate_share: Mapped[float] = mapped_column(Float, default=0.0)
    salt: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column()
    decision: Mapped[dict[str, Any] | None] = mapped_column()
    # What the experiment is judged on, and how it rolls out (experiment.decision / experiment.rollout).
    primary_metric: Mapped[str | None] = mapped_column(String(64))
    rollout: Mapped[dict[str, Any] | None] = mapped_column()
    # A prompt template version as the candidate arm (same model, another prompt). Control always
    # renders with the active version, so promoting such a candidate activates its version.
    candidate_prompt_template_id: Mapped[str | None] = mapped_column(String(36))


class ExperimentEvent(Base):
    """One transition in an experiment's life, with its reason: start, share change, rollout step, end.

    A share change or rollout step starts a new *phase*; the sample-ratio check runs per phase.
    """

    __tablename__ = "experiment_events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    from_share: Mapped[float | None] = mapped_column(Float)
    to_share: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text, default="")
    analysis: Mapped[dict[str, Any] | None] = mapped_column()


class AnswerScore(Base):
    """An automatic score of one logged answer: groundedness by embeddings, or an LLM judge."""

    __tablename__ = "answer_scores"
    __table_args__ = (UniqueConstraint("event_id", "method"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_id: Mapped[str] = mapped_column(ForeignKey("search_events.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))  # "grounding" | "judge"
    score: Mapped[float] = mapped_column(Float)  # 0..1, higher is better
    detail: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptTemplate(Base):
    """Versions are rows: a change makes a new version, never an edit."""

    __tablename__ = "prompt_templates"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    system_prompt: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(Text)
    few_shot: Mapped[list[Any]] = mapped_column(default=list)
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Approved banned_phrase / required_format rules the proxy applies to answers
    # (store.prompts.apply_output_rules); None on versions written before migration 0003.
    output_rules: Mapped[list[Any] | None] = mapped_column(default=list)


class Rule(Base):
    """A rule proposed from users' corrections; an operator approves or rejects it.

    Rules are data (a sentence, a phrase, a format), never code: approved ones go into the next
    prompt template version (store.rules, training.rules).
    """

    __tablename__ = "rules"
    __table_args__ = (UniqueConstraint("kind", "text"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), default="proposed", index=True)  # proposed|approved|rejected
    kind: Mapped[str] = mapped_column(String(32))  # instruction | banned_phrase | required_format
    text: Mapped[str] = mapped_column(Text)
    feedback_ids: Mapped[list[Any]] = mapped_column(default=list)  # the corrections that support it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(256), unique=True)  # versioned, never reused
    base_model: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(String(1024))
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    train_metrics: Mapped[dict[str, Any] | None] = mapped_column()
    eval_metrics: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
