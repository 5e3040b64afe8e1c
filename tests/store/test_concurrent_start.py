"""Replicas that start at the same moment migrate once and agree on one default prompt template."""

from __future__ import annotations

import multiprocessing

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select

from store import prompts
from store.db import MIGRATIONS_DIR, Database
from store.models import PromptTemplate
from tests.store import replica

REPLICAS = 6


def test_replicas_starting_together_migrate_once_and_share_one_template(db_url: str) -> None:
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as separate replicas are
    barrier, results = context.Barrier(REPLICAS), context.Queue()
    children = [context.Process(target=replica.start, args=(db_url, barrier, results)) for _ in range(REPLICAS)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=180) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0] * REPLICAS
    assert [status for status, _ in outcomes] == ["ok"] * REPLICAS, outcomes
    assert len({template_id for _, template_id in outcomes}) == 1

    db = Database(db_url)
    try:
        with db.session() as session:
            rows = session.execute(select(PromptTemplate.version, PromptTemplate.active)
                                   .where(PromptTemplate.name == prompts.DEFAULT_NAME)).all()
            assert session.scalar(select(func.count()).select_from(PromptTemplate)) == 1
        assert [tuple(row) for row in rows] == [(1, True)]
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with db.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_heads()
        assert current == (ScriptDirectory.from_config(config).get_current_head(),)
    finally:
        db.dispose()


def test_only_inactive_versions_get_an_active_default_on_top(db: Database) -> None:
    """Version 1 exists but was written inactive: the default becomes version 2, active."""
    waiting = prompts.new_version(db, system_prompt="s", template="{question}", activate=False)
    template = prompts.active(db)
    assert (waiting.version, template.version, template.active) == (1, 2, True)
    assert template.system_prompt == prompts.DEFAULT_SYSTEM_PROMPT
    assert prompts.active(db).id == template.id
