"""Jobs: jobs, job_gpus, job_events, job_progress.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked by hand against autogenerate: same tables, keys, indexes and
names. Downgrading drops the job tables and everything in them; the telemetry tables are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER (the rowid) on SQLite.
_BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("user", sa.String(length=255), nullable=False),
        sa.Column("uid", sa.Integer(), nullable=False),
        sa.Column("gid", sa.Integer(), nullable=False),
        sa.Column("argv", sa.JSON(), nullable=False),
        sa.Column("cwd", sa.Text(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=True),
        sa.Column("gpu_ids_requested", sa.JSON(), nullable=True),
        sa.Column("watts_per_gpu", sa.Double(), nullable=True),
        sa.Column("energy_budget_wh", sa.Double(), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("mode_effective", sa.String(length=16), nullable=True),
        sa.Column("mode_reason", sa.Text(), nullable=True),
        sa.Column("on_exceed", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("objective", sa.String(length=64), nullable=True),
        sa.Column("total_steps", sa.BigInteger(), nullable=True),
        sa.Column("total_tokens", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attached", sa.Boolean(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("pid_create_time", sa.Double(), nullable=True),
        sa.Column("submitted_at", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_host_state"), "jobs", ["host", "state"], unique=False)
    op.create_table(
        "job_gpus",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["gpu_id"], ["gpus.id"], name=op.f("fk_job_gpus_gpu_id_gpus")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_gpus_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "gpu_id", name=op.f("pk_job_gpus")),
    )
    op.create_table(
        "job_events",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index(
        op.f("ix_job_events_job_id_at"), "job_events", ["job_id", "at"], unique=False
    )
    op.create_table(
        "job_progress",
        sa.Column("id", _BIG_KEY, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("steps", sa.BigInteger(), nullable=True),
        sa.Column("samples", sa.BigInteger(), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_progress_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_progress")),
    )
    op.create_index(
        op.f("ix_job_progress_job_id_at"), "job_progress", ["job_id", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_job_progress_job_id_at"), table_name="job_progress")
    op.drop_table("job_progress")
    op.drop_index(op.f("ix_job_events_job_id_at"), table_name="job_events")
    op.drop_table("job_events")
    op.drop_table("job_gpus")
    op.drop_index(op.f("ix_jobs_host_state"), table_name="jobs")
    op.drop_table("jobs")
