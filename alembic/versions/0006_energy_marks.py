"""Running energy per minute (rollups_1m.energy_cum_mj) and energy marks at job edges.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20 10:00:00

Timestamps are BIGINT microseconds since the Unix epoch (UTC); see telemetry/store/models.py.
Written from the models and checked by hand against autogenerate: same column, table, keys and
names. The upgrade fills ``energy_cum_mj`` of the minutes already stored with a running sum per
GPU (a window function: SQLite 3.33 or later for ``UPDATE ... FROM``), then makes it NOT NULL.
``energy_marks`` starts empty: ``Store.rollup`` marks every job edge whose hour is rolled up the
first time it runs after the upgrade, and reports compute a missing mark on the fly meanwhile.
On SQLite the marks are a WITHOUT ROWID table (rows kept in key order, read without lookups).
Downgrading drops the marks and the running total; the minutes themselves stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rollups_1m") as batch:
        batch.add_column(sa.Column("energy_cum_mj", sa.Double(), nullable=True))
    op.execute(
        "UPDATE rollups_1m SET energy_cum_mj = w.cum FROM ("
        "SELECT gpu_id AS g, minute_start AS m, SUM(energy_mj) OVER ("
        "PARTITION BY gpu_id ORDER BY minute_start ROWS UNBOUNDED PRECEDING) AS cum "
        "FROM rollups_1m) AS w WHERE w.g = rollups_1m.gpu_id AND w.m = rollups_1m.minute_start"
    )
    with op.batch_alter_table("rollups_1m") as batch:
        batch.alter_column("energy_cum_mj", existing_type=sa.Double(), nullable=False)
    op.create_table(
        "energy_marks",
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("energy_cum_mj", sa.Double(), nullable=False),
        sa.Column("before_max_mw", sa.Integer(), nullable=True),
        sa.Column("before_method", sa.String(length=16), nullable=False),
        sa.Column("after_max_mw", sa.Integer(), nullable=True),
        sa.Column("after_method", sa.String(length=16), nullable=False),
        sa.Column("prev_at", sa.BigInteger(), nullable=True),
        sa.Column("from_prev_max_mw", sa.Integer(), nullable=True),
        sa.Column("from_prev_method", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["gpu_id"], ["gpus.id"], name=op.f("fk_energy_marks_gpu_id_gpus"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("gpu_id", "at", name=op.f("pk_energy_marks")),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("energy_marks")
    with op.batch_alter_table("rollups_1m") as batch:
        batch.drop_column("energy_cum_mj")
