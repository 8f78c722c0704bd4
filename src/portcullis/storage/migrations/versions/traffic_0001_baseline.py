"""Traffic baseline: the quota ledger

Revision ID: traffic_0001
Revises: -
Create Date: 2026-11-29

The durable copy of the shared (Redis) quota counters, per (key, period), for several
nodes on one database (`portcullis.traffic.ledger`). Only in a shared database: one
node keeps its quotas in its data directory's `traffic.db`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "traffic_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("traffic",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("quota_ledger",
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("period", sa.String(length=32), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("resets_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", "period"),
        if_not_exists=True,
    )
    op.create_index("ix_quota_ledger_resets_at", "quota_ledger", ["resets_at"], unique=False, if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_quota_ledger_resets_at", table_name="quota_ledger")
    op.drop_table("quota_ledger")
