"""Energy optimiser searches: optimizer_searches (one per search of a job: objective, knob,
choice, why, revisions, profiling cost) and optimizer_probes (what each setting measured).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 03:00:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked against autogenerate (tests/store/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite.
_BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "optimizer_searches",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("objective", sa.String(length=16), nullable=False),
        sa.Column("knob", sa.String(length=16), nullable=False),
        sa.Column("setting", sa.Integer(), nullable=False),
        sa.Column("top_setting", sa.Integer(), nullable=False),
        sa.Column("feasible", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("revisions", sa.Integer(), nullable=False),
        sa.Column("profiling_steps", sa.BigInteger(), nullable=False),
        sa.Column("profiling_time_s", sa.Double(), nullable=False),
        sa.Column("profiling_energy_j", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_optimizer_searches_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_optimizer_searches")),
        sa.UniqueConstraint("job_id", "number", name=op.f("uq_optimizer_searches_job_id_number")),
    )
    op.create_table(
        "optimizer_probes",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("search_id", sa.BigInteger(), nullable=False),
        sa.Column("setting", sa.Integer(), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("time_s", sa.Double(), nullable=False),
        sa.Column("energy_j", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["search_id"], ["optimizer_searches.id"],
            name=op.f("fk_optimizer_probes_search_id_optimizer_searches"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_optimizer_probes")),
        sa.UniqueConstraint(
            "search_id", "setting", name=op.f("uq_optimizer_probes_search_id_setting")
        ),
    )


def downgrade() -> None:
    op.drop_table("optimizer_probes")
    op.drop_table("optimizer_searches")
