"""The Alembic migrations create exactly the schema store/models.py declares."""

from __future__ import annotations

import subprocess
import sys

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from store import experiments, prompts
from store.db import MIGRATIONS_DIR, Database
from store.models import Base

TABLES = {"search_events", "feedback", "experiments", "prompt_templates", "adapters", "experiment_events",
          "answer_scores", "rules"}


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names()) - {"alembic_version"}


def test_migrate_creates_every_table_and_is_idempotent(empty_db: Database) -> None:
    assert _tables(empty_db) == set()
    empty_db.migrate()
    assert _tables(empty_db) == TABLES
    empty_db.migrate()  # a second run is a no-op
    assert _tables(empty_db) == TABLES
    with empty_db.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == "0004"


def test_migrated_schema_matches_the_models(db: Database) -> None:
    """Autogenerate finds nothing to add, drop or change: names follow the naming convention."""
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    inspector = inspect(db.engine)
    assert inspector.get_pk_constraint("search_events")["name"] == "pk_search_events"
    [fk] = inspector.get_foreign_keys("feedback")
    assert fk["referred_table"] == "search_events"
    assert fk["name"] == "fk_feedback_event_id_search_events"
    assert {ix["name"] for ix in inspector.get_indexes("search_events")} == {
        "ix_search_events_ts",
        "ix_search_events_user_id",
        "ix_search_events_experiment_id",
    }
    uniques = {uq["name"] for uq in inspector.get_unique_constraints("prompt_templates")}
    assert "uq_prompt_templates_name" in uniques


def test_downgrade_drops_everything(db: Database) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert _tables(db) == set()
    db.migrate()
    assert _tables(db) == TABLES


def test_0003_keeps_existing_rows_and_adds_prompt_rules(empty_db: Database) -> None:
    """Upgrading a store written by 0002: old rows keep their values, the new columns are empty."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with empty_db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    with empty_db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO experiments (id, control_base_url, control_model, candidate_share, salt, status, started_at) "
            "VALUES ('e1', 'http://c/v1', 'm', 0.5, 's', 'running', CURRENT_TIMESTAMP)"))
        connection.execute(text(
            "INSERT INTO prompt_templates (id, name, version, system_prompt, template, few_shot, active, created_at) "
            "VALUES ('t1', 'search-answer', 1, 'sys', '{question}', '[]', true, CURRENT_TIMESTAMP)"))
    empty_db.migrate()
    experiment = experiments.get(empty_db, "e1")
    assert (experiment.candidate_share, experiment.candidate_prompt_template_id) == (0.5, None)
    template = prompts.get(empty_db, "t1")
    assert (template.system_prompt, template.active, template.output_rules) == ("sys", True, None)
    with empty_db.engine.connect() as connection:
        assert {c["name"] for c in inspect(connection).get_columns("rules")} == {
            "id", "status", "kind", "text", "feedback_ids", "created_at", "decided_at"}


def test_importing_store_pulls_in_no_heavy_packages() -> None:
    code = (
        "import sys, store, store.config, store.models, store.db, store.experiments, store.prompts, "
        "store.events, store.writer, store.scores, store.rules, experiment, experiment.lifecycle, "
        "experiment.assignment, experiment.metrics, experiment.collect, experiment.status\n"
        "heavy = [m for m in ('torch', 'faiss', 'fastapi', 'transformers', 'sentence_transformers', "
        "'retrieval', 'proxy', 'training', 'flows', 'serving') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
