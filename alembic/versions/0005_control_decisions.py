"""Control decisions: control_decisions (what each controller or guard changed for a job, why,
and the power and throughput before and after).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 23:50:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked by hand against autogenerate: same table, keys, index and
names.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite.
_BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "control_decisions",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("what", sa.Text(), nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("power_before_w", sa.Double(), nullable=True),
        sa.Column("steps_per_s_before", sa.Double(), nullable=True),
        sa.Column("power_after_w", sa.Double(), nullable=True),
        sa.Column("steps_per_s_after", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_control_decisions_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_control_decisions")),
    )
    op.create_index(
        op.f("ix_control_decisions_job_id_at"), "control_decisions", ["job_id", "at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_control_decisions_job_id_at"), table_name="control_decisions")
    op.drop_table("control_decisions")
