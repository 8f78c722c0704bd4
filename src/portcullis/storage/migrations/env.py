"""Alembic environment: runs on the connection `portcullis.storage.migrations` hands in
(``config.attributes["connection"]``), inside the caller's transaction and lock."""

from __future__ import annotations

from alembic import context

from portcullis.storage.migrations import BRANCHES, VERSION_TABLE, target_metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `portcullis db upgrade` (portcullis.storage.migrations.upgrade)")

context.configure(
    connection=connection,
    target_metadata=target_metadata(config.attributes.get("branches", BRANCHES)),
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things: later revisions use batch mode (copy and move).
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
