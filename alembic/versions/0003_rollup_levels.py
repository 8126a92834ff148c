"""Coarser rollups: rollups_levels (10-minute and one-hour buckets summed from rollups_1m).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
No data is copied here: ``Store.rollup`` fills the buckets of every complete 10 minutes and hour
from the minute rollups already stored, the first time it runs after the upgrade. Downgrading
drops the table; the minute rollups they were summed from stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollups_levels",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("level_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", sa.BigInteger(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("energy_mj", sa.Double(), nullable=False),
        sa.Column("mean_power_mw", sa.Double(), nullable=True),
        sa.Column("min_power_mw", sa.Integer(), nullable=True),
        sa.Column("max_power_mw", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_rollups_levels_gpu_id_gpus"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "gpu_id", "level_s", "bucket_start", name=op.f("pk_rollups_levels")
        ),
    )


def downgrade() -> None:
    op.drop_table("rollups_levels")
