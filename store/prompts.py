"""Prompt templates: every change is a new version; exactly one version per name is active."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from store.db import Database
from store.models import PromptTemplate

DEFAULT_NAME = "search-answer"
DEFAULT_SYSTEM_PROMPT = (
    "You are a search assistant. Answer the question using only the numbered context passages. "
    "Be concise. If the context does not contain the answer, say so."
)
DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"


def active(db: Database, name: str = DEFAULT_NAME) -> PromptTemplate:
    """The active version, creating version 1 from the defaults on first use."""
    with db.session() as session:
        found = session.scalars(
            select(PromptTemplate)
            .where(PromptTemplate.name == name, PromptTemplate.active.is_(True))
            .order_by(PromptTemplate.version.desc())
        ).first()
    if found is not None:
        return found
    return new_version(db, name=name, system_prompt=DEFAULT_SYSTEM_PROMPT, template=DEFAULT_TEMPLATE)


def new_version(
    db: Database,
    *,
    name: str = DEFAULT_NAME,
    system_prompt: str,
    template: str,
    few_shot: list[dict[str, Any]] | None = None,
) -> PromptTemplate:
    """Add a version and make it the active one; earlier versions stay as they were written."""
    if "{question}" not in template:
        raise ValueError("template must contain {question}")
    with db.session() as session:
        latest = session.scalar(select(func.max(PromptTemplate.version)).where(PromptTemplate.name == name))
        for row in session.scalars(select(PromptTemplate).where(PromptTemplate.name == name)):
            row.active = False
        row = PromptTemplate(
            name=name,
            version=(latest or 0) + 1,
            system_prompt=system_prompt,
            template=template,
            few_shot=few_shot or [],
            active=True,
        )
        session.add(row)
    return row
