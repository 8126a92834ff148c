"""The cluster power cap: its one state row (the cap, the leader's lease and term) and what the
leader gave each node and job.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 19:45:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked against autogenerate (tests/store/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cluster_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cap_w", sa.Double(), nullable=True),
        sa.Column("set_by", sa.String(length=255), nullable=True),
        sa.Column("set_at", sa.BigInteger(), nullable=True),
        sa.Column("leader", sa.String(length=255), nullable=True),
        sa.Column("leader_since", sa.BigInteger(), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("divided_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_state")),
    )
    op.create_table(
        "cluster_shares",
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("watts", sa.Double(), nullable=False),
        sa.Column("expected_w", sa.Double(), nullable=False),
        sa.Column("rate_rel", sa.Double(), nullable=True),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node", "job_id", name=op.f("pk_cluster_shares")),
    )


def downgrade() -> None:
    op.drop_table("cluster_shares")
    op.drop_table("cluster_state")
