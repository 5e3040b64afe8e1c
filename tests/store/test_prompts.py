"""Prompt templates: versions are rows, never edits."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from store import prompts
from store.db import Database
from store.models import PromptTemplate


def test_active_seeds_version_one(db: Database) -> None:
    first = prompts.active(db)
    assert (first.name, first.version, first.active) == (prompts.DEFAULT_NAME, 1, True)
    assert first.system_prompt == prompts.DEFAULT_SYSTEM_PROMPT
    assert first.template == prompts.DEFAULT_TEMPLATE and first.few_shot == []
    again = prompts.active(db)
    assert again.id == first.id


def test_new_version_becomes_active_and_leaves_v1_unchanged(db: Database) -> None:
    v1 = prompts.active(db)
    shots = [{"question": "q", "answer": "a"}]
    v2 = prompts.new_version(db, system_prompt="Be brief.", template="Q: {question}\n{context}", few_shot=shots)
    assert (v2.version, v2.active, v2.few_shot) == (2, True, shots)
    assert prompts.active(db).id == v2.id
    with db.session() as session:
        rows = {row.version: row for row in session.scalars(select(PromptTemplate))}
    assert set(rows) == {1, 2}
    old = rows[1]
    assert old.id == v1.id and old.active is False
    assert (old.system_prompt, old.template, old.few_shot) == (v1.system_prompt, v1.template, v1.few_shot)
    assert old.created_at is not None


def test_names_are_independent_and_templates_need_a_question(db: Database) -> None:
    prompts.active(db)
    other = prompts.new_version(db, name="other", system_prompt="s", template="{question}")
    assert other.version == 1
    assert prompts.active(db).version == 1
    with pytest.raises(ValueError):
        prompts.new_version(db, system_prompt="s", template="no placeholder")
