"""Key store baseline: API keys, token revocations, revision counter

Revision ID: keys_0001
Revises: -
Create Date: 2026-05-01

Baseline of the keys store: the tables as earlier versions created them with
`create_all`. Every table and index is created only if missing, so a database made by an
earlier version upgrades in place; a fresh one gets the whole schema.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "keys_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("keys",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("api_keys",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tenant", sa.String(length=200), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("roles", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("rate_limit", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
        sa.UniqueConstraint("name"),
        if_not_exists=True,
    )
    op.create_table("store_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        if_not_exists=True,
    )
    op.create_table("token_revocations",
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "value"),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("token_revocations")
    op.drop_table("store_revision")
    op.drop_table("api_keys")
