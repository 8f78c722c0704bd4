"""API keys may require RFC 9421 signatures by a named key: `api_keys.signing_key_id`.

Revision ID: keys_0002
Revises: keys_0001
Create Date: 2026-05-01

Earlier SQLite stores got this column from the store's own additive check; the column is
added only where it is missing, so those stores upgrade too.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "keys_0002"
down_revision: str | Sequence[str] | None = "keys_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("api_keys")}
    if "signing_key_id" not in columns:
        with op.batch_alter_table("api_keys") as batch:
            batch.add_column(sa.Column("signing_key_id", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("signing_key_id")
