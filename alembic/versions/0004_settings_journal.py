"""Settings journal: settings_journal (every GPU setting powertrain changes, and its undo).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 10:00:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked by hand against autogenerate: same table, keys, indexes and
names. Downgrading drops the journal: run it only with no powertrain setting in force (a stopped
daemon has undone them all), or the next daemon cannot know what to put back.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite.
_BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "settings_journal",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("setting", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("min_clock_mhz", sa.Integer(), nullable=True),
        sa.Column("previous_value", sa.Integer(), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_at", sa.BigInteger(), nullable=False),
        sa.Column("applied_at", sa.BigInteger(), nullable=True),
        sa.Column("undone_at", sa.BigInteger(), nullable=True),
        sa.Column("undo_reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_settings_journal_gpu_id_gpus")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_settings_journal_job_id_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settings_journal")),
    )
    op.create_index(
        op.f("ix_settings_journal_host_status"), "settings_journal", ["host", "status"],
        unique=False,
    )
    op.create_index(
        op.f("ix_settings_journal_job_id"), "settings_journal", ["job_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_settings_journal_job_id"), table_name="settings_journal")
    op.drop_index(op.f("ix_settings_journal_host_status"), table_name="settings_journal")
    op.drop_table("settings_journal")
