"""Prompt templates: every change is a new version; exactly one version per name is active."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import func, select

from store.db import Database
from store.models import PromptTemplate

DEFAULT_NAME = "search-answer"
DEFAULT_SYSTEM_PROMPT = (
    "You are a search assistant. Answer the question using only the numbered context passages. "
    "Be concise. If the context does not contain the answer, say so."
)
DEFAULT_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
_FIELD = re.compile(r"\{(context|question)\}")


class Passage(Protocol):
    title: str
    text: str


def render_messages(
    system_prompt: str,
    template: str,
    few_shot: Sequence[dict[str, Any]],
    passages: Sequence[Passage],
    question: str,
) -> list[dict[str, Any]]:
    """The chat messages for a question over retrieved passages.

    The proxy sends exactly these and logs them verbatim; training and synthetic QA build their
    prompts with the same function, so a model learns from what it will be shown.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    for example in few_shot:
        messages.append({"role": "user", "content": example["question"]})
        messages.append({"role": "assistant", "content": example["answer"]})
    context = (
        "\n\n".join(f"[{n}] {passage.title}\n{passage.text}" for n, passage in enumerate(passages, start=1))
        if passages
        else "(no passages found)"
    )
    values = {"context": context, "question": question}
    # One pass, so a question that happens to contain "{context}" stays as the user typed it.
    messages.append({"role": "user", "content": _FIELD.sub(lambda m: values[m.group(1)], template)})
    return messages


def find_active(db: Database, name: str = DEFAULT_NAME) -> PromptTemplate | None:
    with db.session() as session:
        return session.scalars(
            select(PromptTemplate)
            .where(PromptTemplate.name == name, PromptTemplate.active.is_(True))
            .order_by(PromptTemplate.version.desc())
        ).first()


def active(db: Database, name: str = DEFAULT_NAME) -> PromptTemplate:
    """The active version, creating version 1 from the defaults on first use."""
    found = find_active(db, name)
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
