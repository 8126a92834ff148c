"""The micro-batch in optimiser searches: a joint search's chosen micro-batch and the job's own
(optimizer_searches), and the micro-batch each probe ran at (optimizer_probes, whose settings are
then unique per micro-batch).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 22:00:00

Written from the models and checked against autogenerate (tests/store/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("optimizer_searches") as batch:
        batch.add_column(sa.Column("micro_batch", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("default_micro_batch", sa.Integer(), nullable=True))
    with op.batch_alter_table("optimizer_probes") as batch:
        batch.add_column(sa.Column("micro_batch", sa.Integer(), nullable=True))
        batch.drop_constraint("uq_optimizer_probes_search_id_setting", type_="unique")
        batch.create_unique_constraint(
            "uq_optimizer_probes_search_id_micro_batch_setting",
            ["search_id", "micro_batch", "setting"],
        )


def downgrade() -> None:
    # A joint search's probes at other micro-batches than the chosen one's settings would
    # collide under the old constraint: they go.
    op.execute("DELETE FROM optimizer_probes WHERE micro_batch IS NOT NULL AND id NOT IN "
               "(SELECT MIN(id) FROM optimizer_probes GROUP BY search_id, setting)")
    with op.batch_alter_table("optimizer_probes") as batch:
        batch.drop_constraint("uq_optimizer_probes_search_id_micro_batch_setting",
                              type_="unique")
        batch.create_unique_constraint("uq_optimizer_probes_search_id_setting",
                                       ["search_id", "setting"])
        batch.drop_column("micro_batch")
    with op.batch_alter_table("optimizer_searches") as batch:
        batch.drop_column("default_micro_batch")
        batch.drop_column("micro_batch")
