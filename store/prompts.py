"""Prompt templates: every change is a new version; exactly one version per name is active.

Also what a version does to the text on either side of the model: `render_messages` (what goes in)
and `apply_output_rules` (what comes out).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.db import Database, insert_ignoring
from store.models import Feedback, PromptTemplate, SearchEvent, new_id, utcnow

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
    """The active version, creating version 1 from the defaults on first use.

    Replicas that start together all get here with no template yet: version 1 is inserted with
    ON CONFLICT (name, version) DO NOTHING, so one of them writes it and every one reads it back.
    """
    found = find_active(db, name)
    if found is None:
        _create_first_version(db, name)
        found = find_active(db, name)
    if found is None:  # versions exist, none active: each was written with activate=False
        found = new_version(db, name=name, system_prompt=DEFAULT_SYSTEM_PROMPT, template=DEFAULT_TEMPLATE)
    return found


def _create_first_version(db: Database, name: str) -> None:
    with db.session() as session:
        dialect = session.get_bind().dialect.name
        session.execute(
            insert_ignoring(dialect, PromptTemplate.__table__, conflict=("name", "version")).values(
                id=new_id(), name=name, version=1, system_prompt=DEFAULT_SYSTEM_PROMPT, template=DEFAULT_TEMPLATE,
                few_shot=[], output_rules=[], active=True, created_at=utcnow(),
            )
        )


def new_version(
    db: Database,
    *,
    name: str = DEFAULT_NAME,
    system_prompt: str,
    template: str,
    few_shot: list[dict[str, Any]] | None = None,
    output_rules: list[dict[str, Any]] | None = None,
    activate: bool = True,
) -> PromptTemplate:
    """Add a version and make it the active one; earlier versions stay as they were written.

    `activate=False` leaves the active version as it is: the new one can then be tried as the
    candidate arm of an experiment before it serves everyone.
    """
    if "{question}" not in template:
        raise ValueError("template must contain {question}")
    with db.session() as session:
        latest = session.scalar(select(func.max(PromptTemplate.version)).where(PromptTemplate.name == name))
        row = PromptTemplate(
            name=name,
            version=(latest or 0) + 1,
            system_prompt=system_prompt,
            template=template,
            few_shot=few_shot or [],
            output_rules=output_rules or [],
            active=False,
        )
        session.add(row)
        session.flush()
        if activate:
            activate_in(session, row.id)
    return row


def activate_in(session: Session, template_id: str) -> PromptTemplate:
    """Make a version the active one of its name, in the caller's transaction (a promotion is one)."""
    row = session.get(PromptTemplate, template_id)
    if row is None:
        raise LookupError(f"unknown prompt template {template_id!r}")
    for other in session.scalars(select(PromptTemplate).where(PromptTemplate.name == row.name)):
        other.active = other.id == row.id
    return row


def get(db: Database, template_id: str) -> PromptTemplate | None:
    with db.session() as session:
        return session.get(PromptTemplate, template_id)


def list_versions(db: Database, *, active_only: bool = False) -> list[PromptTemplate]:
    """Every version of every template, newest first."""
    query = select(PromptTemplate).order_by(PromptTemplate.created_at.desc(), PromptTemplate.version.desc())
    if active_only:
        query = query.where(PromptTemplate.active.is_(True))
    with db.session() as session:
        return list(session.scalars(query))


def usage(db: Database, template_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per version: the events served with it and the feedback rows on those events."""
    counts = {template_id: {"events": 0, "feedback": 0} for template_id in template_ids}
    if not counts:
        return counts
    events = (
        select(SearchEvent.prompt_template_id, func.count())
        .where(SearchEvent.prompt_template_id.in_(counts))
        .group_by(SearchEvent.prompt_template_id)
    )
    feedback = (
        select(SearchEvent.prompt_template_id, func.count())
        .join(Feedback, Feedback.event_id == SearchEvent.id)
        .where(SearchEvent.prompt_template_id.in_(counts))
        .group_by(SearchEvent.prompt_template_id)
    )
    with db.session() as session:
        for template_id, n in session.execute(events):
            counts[template_id]["events"] = int(n)
        for template_id, n in session.execute(feedback):
            counts[template_id]["feedback"] = int(n)
    return counts


def served_with(db: Database, name: str, since: datetime | None = None) -> Iterator[tuple[SearchEvent, list[Feedback]]]:
    """Events served with any version of the template `name` (since `since`), each with its feedback.

    Any version, not one: every tuning makes a new version, and a window that restarted at each
    one would hold a day of evidence at most.
    """
    versions = select(PromptTemplate.id).where(PromptTemplate.name == name)
    query = (
        select(SearchEvent, Feedback)
        .join(Feedback, Feedback.event_id == SearchEvent.id)
        .where(SearchEvent.prompt_template_id.in_(versions))
        .order_by(SearchEvent.ts, SearchEvent.id, Feedback.ts, Feedback.id)
    )
    if since is not None:
        query = query.where(SearchEvent.ts >= since)
    with db.session() as session:
        for _event_id, rows in groupby(session.execute(query), key=lambda row: row[0].id):
            pairs = list(rows)
            yield pairs[0][0], [feedback for _event, feedback in pairs]


# --- output rules: plain text transforms, driven by data -------------------------------------------

BANNED_PHRASE = "banned_phrase"
REQUIRED_FORMAT = "required_format"
_FORMAT_FIELD = re.compile(r"\{(answer|title)\}")


def apply_output_rules(answer: str, rules: Sequence[Mapping[str, Any]], titles: Sequence[str] = ()) -> str:
    """The answer with a template version's output rules applied, in order.

    * `banned_phrase`: every occurrence of the text is removed (case-insensitive, literal).
    * `required_format`: the text is a format with `{answer}` (once) and optionally `{title}`
      (the first retrieved passage's title), e.g. "Answer: {answer}" or "{answer}\nSource: {title}".
      An answer that already has that shape is left alone, so applying the rules twice changes
      nothing; a format that needs a title is skipped when nothing was retrieved.

    Unknown kinds and malformed formats are skipped: an answer is never lost to a bad rule.
    """
    for rule in rules:
        kind, text = rule.get("kind"), rule.get("text")
        if not isinstance(text, str) or not text.strip():
            continue
        if kind == BANNED_PHRASE:
            answer = _remove_phrase(answer, text.strip())
        elif kind == REQUIRED_FORMAT:
            answer = _fit_format(answer, text, titles)
    return answer


def _remove_phrase(answer: str, phrase: str) -> str:
    pattern = re.compile(rf"[ \t]*{re.escape(phrase)}[ \t]*", re.IGNORECASE)

    def _gap(match: re.Match[str]) -> str:
        # Keep one space between the words either side; nothing at a line's start or end.
        at_edge = match.start() == 0 or match.end() == len(answer) or "\n" in (
            answer[match.start() - 1], answer[match.end()])
        return "" if at_edge else " "

    removed = pattern.sub(_gap, answer)
    return removed.strip() if removed != answer else answer


def _fit_format(answer: str, fmt: str, titles: Sequence[str]) -> str:
    fields = _FORMAT_FIELD.findall(fmt)
    if fields.count("answer") != 1 or ("title" in fields and not titles):
        return answer
    body = answer.strip()
    if _format_pattern(fmt).fullmatch(body):
        return answer
    values = {"answer": body, "title": titles[0] if titles else ""}
    # One pass, so an answer that happens to contain "{title}" stays as the model wrote it.
    return _FORMAT_FIELD.sub(lambda m: values[m.group(1)], fmt)


def _format_pattern(fmt: str) -> re.Pattern[str]:
    """The format as a regex: placeholders match any text, any run of whitespace matches any other."""
    parts = []
    for piece in re.split(r"(\{answer\}|\{title\}|\s+)", fmt.strip()):
        if piece == "{answer}":
            parts.append(r"(?:.*?)")
        elif piece == "{title}":
            parts.append(r"(?:[^\n]+?)")
        elif piece and piece.isspace():
            parts.append(r"\s*")
        elif piece:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)
