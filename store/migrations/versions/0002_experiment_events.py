"""Experiment phases and answer scores: `experiment_events`, `answer_scores`, and the
experiment's primary metric and rollout plan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("primary_metric", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("rollout", sa.JSON(), nullable=True))

    op.create_table(
        "experiment_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.String(length=36), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("from_share", sa.Float(), nullable=True),
        sa.Column("to_share", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("analysis", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"],
                                name=op.f("fk_experiment_events_experiment_id_experiments")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiment_events")),
    )
    op.create_index(op.f("ix_experiment_events_experiment_id"), "experiment_events", ["experiment_id"])
    op.create_index(op.f("ix_experiment_events_ts"), "experiment_events", ["ts"])

    op.create_table(
        "answer_scores",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["event_id"], ["search_events.id"],
                                name=op.f("fk_answer_scores_event_id_search_events")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_answer_scores")),
        sa.UniqueConstraint("event_id", "method", name=op.f("uq_answer_scores_event_id")),
    )
    op.create_index(op.f("ix_answer_scores_event_id"), "answer_scores", ["event_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_answer_scores_event_id"), table_name="answer_scores")
    op.drop_table("answer_scores")
    op.drop_index(op.f("ix_experiment_events_ts"), table_name="experiment_events")
    op.drop_index(op.f("ix_experiment_events_experiment_id"), table_name="experiment_events")
    op.drop_table("experiment_events")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("rollout")
        batch.drop_column("primary_metric")
