"""Job deadlines: jobs.deadline_at (when the job must end; the energy forecast runs against it
when the job declared no total steps or tokens).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 00:30:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deadline_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deadline_at")
