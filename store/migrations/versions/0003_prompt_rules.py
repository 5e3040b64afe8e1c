"""Prompt tuning and rules from corrections: the `rules` table, a template version's output rules,
and a prompt template version as an experiment's candidate arm.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("candidate_prompt_template_id", sa.String(length=36), nullable=True))
    with op.batch_alter_table("prompt_templates") as batch:
        batch.add_column(sa.Column("output_rules", sa.JSON(), nullable=True))

    op.create_table(
        "rules",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("feedback_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
        sa.UniqueConstraint("kind", "text", name=op.f("uq_rules_kind")),
    )
    op.create_index(op.f("ix_rules_status"), "rules", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rules_status"), table_name="rules")
    op.drop_table("rules")
    with op.batch_alter_table("prompt_templates") as batch:
        batch.drop_column("output_rules")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("candidate_prompt_template_id")
