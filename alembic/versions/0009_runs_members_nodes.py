"""Distributed runs: jobs gain a run key (one live job per key), world size, generation, a
collective hold (action, step, reason) and the setting its owner's optimiser holds it at (knob,
knob_setting); job_members holds each process of a job (rank, node, pid, GPUs, its own totals);
nodes holds each daemon's node and heartbeat.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:30:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked against autogenerate (tests/store/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_COLUMNS = (
    sa.Column("run_key", sa.String(length=255), nullable=True),
    sa.Column("world_size", sa.Integer(), nullable=True),
    sa.Column("generation", sa.Integer(), nullable=True),
    sa.Column("hold", sa.String(length=16), nullable=True),
    sa.Column("hold_step", sa.BigInteger(), nullable=True),
    sa.Column("hold_reason", sa.Text(), nullable=True),
    sa.Column("knob", sa.String(length=16), nullable=True),
    sa.Column("knob_setting", sa.Integer(), nullable=True),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in _JOB_COLUMNS:
            batch.add_column(column)
    live = sa.text("ended_at IS NULL")
    op.create_index("uq_jobs_live_run_key", "jobs", ["run_key"], unique=True,
                    sqlite_where=live, postgresql_where=live)
    op.create_table(
        "job_members",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("local_rank", sa.Integer(), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pid_create_time", sa.Double(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("joined_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("reported_at", sa.BigInteger(), nullable=True),
        sa.Column("steps", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("step_time_s", sa.Double(), nullable=True),
        sa.Column("steps_per_s", sa.Double(), nullable=True),
        sa.Column("duty", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_members_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_members")),
        sa.UniqueConstraint(
            "job_id", "generation", "rank", name=op.f("uq_job_members_job_id_generation_rank")
        ),
    )
    op.create_index(op.f("ix_job_members_host_state"), "job_members", ["host", "state"])
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_at", sa.BigInteger(), nullable=False),
        sa.Column("stopped_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_nodes")),
    )


def downgrade() -> None:
    op.drop_table("nodes")
    op.drop_index(op.f("ix_job_members_host_state"), table_name="job_members")
    op.drop_table("job_members")
    op.drop_index("uq_jobs_live_run_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_JOB_COLUMNS):
            batch.drop_column(column.name)
