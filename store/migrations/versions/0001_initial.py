"""Initial schema: the five tables of DESIGN.md.

Generated with `alembic revision --autogenerate` against an empty SQLite database, then
reviewed by hand. Constraint and index names follow `store.models.NAMING`, so they are the
same on SQLite and PostgreSQL. Plain `op.create_index` works on both (no batch mode needed
for a create).

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "search_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("session_id", sa.String(length=256), nullable=True),
        sa.Column("experiment_id", sa.String(length=36), nullable=True),
        sa.Column("arm", sa.String(length=16), nullable=False),
        sa.Column("served_arm", sa.String(length=16), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("retrieved", sa.JSON(), nullable=False),
        sa.Column("prompt_template_id", sa.String(length=36), nullable=True),
        sa.Column("prompt_template_version", sa.Integer(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=True),
        sa.Column("tokens_out", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_search_events")),
    )
    op.create_index(op.f("ix_search_events_ts"), "search_events", ["ts"], unique=False)
    op.create_index(op.f("ix_search_events_user_id"), "search_events", ["user_id"], unique=False)
    op.create_index(op.f("ix_search_events_experiment_id"), "search_events", ["experiment_id"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("thumbs", sa.String(length=8), nullable=True),
        sa.Column("corrected_answer", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["event_id"], ["search_events.id"], name=op.f("fk_feedback_event_id_search_events")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_event_id"), "feedback", ["event_id"], unique=False)
    op.create_index(op.f("ix_feedback_ts"), "feedback", ["ts"], unique=False)

    op.create_table(
        "experiments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("control_base_url", sa.String(length=1024), nullable=False),
        sa.Column("control_model", sa.String(length=256), nullable=False),
        sa.Column("control_adapter_id", sa.String(length=36), nullable=True),
        sa.Column("candidate_base_url", sa.String(length=1024), nullable=True),
        sa.Column("candidate_model", sa.String(length=256), nullable=True),
        sa.Column("candidate_adapter_id", sa.String(length=36), nullable=True),
        sa.Column("candidate_share", sa.Float(), nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
    )
    op.create_index(op.f("ix_experiments_status"), "experiments", ["status"], unique=False)

    op.create_table(
        "prompt_templates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("few_shot", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_templates")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_prompt_templates_name")),
    )

    op.create_table(
        "adapters",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("base_model", sa.String(length=256), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("dataset_hash", sa.String(length=64), nullable=True),
        sa.Column("train_metrics", sa.JSON(), nullable=True),
        sa.Column("eval_metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", name=op.f("uq_adapters_name")),
    )


def downgrade() -> None:
    op.drop_table("adapters")
    op.drop_table("prompt_templates")
    op.drop_index(op.f("ix_experiments_status"), table_name="experiments")
    op.drop_table("experiments")
    op.drop_index(op.f("ix_feedback_ts"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_event_id"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_search_events_experiment_id"), table_name="search_events")
    op.drop_index(op.f("ix_search_events_user_id"), table_name="search_events")
    op.drop_index(op.f("ix_search_events_ts"), table_name="search_events")
    op.drop_table("search_events")
