"""Alembic migrations for every store, run from code (`portcullis db upgrade`) or by a
store opening an external database with ``storage.auto_migrate``.

One *branch* per store (``keys``, ``audit``, ``oauth``, ``governance``, ``traffic``), each
with its own base revision. A shared database (PostgreSQL, or one SQLite URL) carries every
head in one version table; the default layout (one SQLite file per store in the data
directory) carries one branch per file, and has no traffic store (`DEFAULT_FILES`). So the
same revisions migrate both layouts.

The version table is ``portcullis_alembic_version``, so an operator's own Alembic history
in the same database is left alone. Upgrades take a lock first (PostgreSQL: a transaction
advisory lock; SQLite: ``BEGIN IMMEDIATE``), so several nodes starting at once upgrade
once, and DDL is transactional on both, so a failed upgrade leaves the previous schema.

The baseline revisions create tables only where they are missing: a database created by
an earlier version's ``create_all`` upgrades in place without losing a row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from portcullis.storage.engine import StorageConfig, StorageError, make_engine

Branch = Literal["keys", "audit", "oauth", "governance", "traffic"]
BRANCHES: tuple[Branch, ...] = ("keys", "audit", "oauth", "governance", "traffic")
# The default layout: each store's SQLite file in the data directory. The traffic store
# (the quota ledger) exists only in a shared database: one node keeps its quota counts
# in `traffic.db` itself (`portcullis.traffic.quota`).
DEFAULT_FILES: dict[Branch, str] = {"keys": "portcullis.db", "audit": "audit.db", "oauth": "oauth.db",
                                    "governance": "governance.db"}
VERSION_TABLE = "portcullis_alembic_version"
_LOCK_KEY = 0x706F7274  # "port": the advisory lock id the upgrade holds on PostgreSQL
_HERE = Path(__file__).resolve().parent


def target_metadata(branches: Iterable[Branch] = BRANCHES) -> sa.MetaData:
    """The tables the current code expects, for the given stores (one MetaData).

    Imported lazily: the storage layer sits below the stores it migrates.
    """
    from portcullis.audit.sqlite import metadata as audit_md
    from portcullis.governance.store import metadata as gov_md
    from portcullis.oauth import authorize, client_auth, consent, identity, keys, refresh, rfc9126  # noqa: F401
    from portcullis.oauth.db import metadata as oauth_md
    from portcullis.storage.sqlite_keys import metadata as keys_md
    from portcullis.traffic.ledger import metadata as traffic_md

    by_branch = {"keys": keys_md, "audit": audit_md, "oauth": oauth_md, "governance": gov_md, "traffic": traffic_md}
    combined = sa.MetaData()
    for b in branches:
        for table in by_branch[b].sorted_tables:
            table.to_metadata(combined)
    return combined


def alembic_config(connection: sa.Connection | None = None, branches: Sequence[Branch] = BRANCHES) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(_HERE / "versions"))
    cfg.attributes["connection"] = connection
    cfg.attributes["branches"] = tuple(branches)
    return cfg


def heads(branches: Sequence[Branch] = BRANCHES) -> set[str]:
    """The newest revision of each branch in this code."""
    script = ScriptDirectory.from_config(alembic_config())
    out = set()
    for b in branches:
        rev = script.get_revision(f"{b}@head")
        if rev is None:
            raise StorageError(f"no migrations for the {b} store")
        out.add(rev.revision)
    return out


def current(engine: sa.Engine) -> set[str]:
    """The revisions the database is at (empty: never migrated)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return set(ctx.get_current_heads())


def _migration_engine(engine: sa.Engine) -> tuple[sa.Engine, bool]:
    """An engine whose transactions lock out other migrators; (engine, owned)."""
    if engine.dialect.name == "sqlite":
        # pysqlite runs DDL outside its implicit transactions; BEGIN IMMEDIATE holds the write lock.
        own = make_engine(engine.url, StorageConfig(busy_timeout_seconds=30.0), sqlite_explicit_begin=True)
        return own.execution_options(portcullis_begin="IMMEDIATE"), True
    return engine, False


def upgrade(engine: sa.Engine, branches: Sequence[Branch] = BRANCHES) -> None:
    """Bring `branches` to their heads, in one transaction, under the migration lock."""
    eng, owned = _migration_engine(engine)
    try:
        with eng.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            for b in branches:
                command.upgrade(alembic_config(conn, branches), f"{b}@head")
    finally:
        if owned:
            eng.dispose()


def upgrade_to(engine: sa.Engine, revision: str) -> None:
    """Upgrade to one named revision (tests build older schemas with it)."""
    eng, owned = _migration_engine(engine)
    try:
        with eng.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
    finally:
        if owned:
            eng.dispose()


def diff(engine: sa.Engine, branches: Sequence[Branch] = BRANCHES) -> list[Any]:
    """Differences between the database's schema and the code's tables (empty: they agree).

    Alembic's autogenerate comparison; server defaults are not compared.
    """
    md = target_metadata(branches)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True,
                                                     "target_metadata": md})
        return list(compare_metadata(ctx, md))


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands: its revisions, the code's heads, and what is missing."""

    current: frozenset[str]
    heads: frozenset[str]

    @property
    def up_to_date(self) -> bool:
        return self.heads <= self.current

    @property
    def ahead(self) -> frozenset[str]:
        """Revisions in the database this code does not know (a newer version migrated it)."""
        return self.current - _known()


def _known() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(r.revision for r in script.walk_revisions())


def state(engine: sa.Engine, branches: Sequence[Branch] = BRANCHES) -> SchemaState:
    return SchemaState(frozenset(current(engine)), frozenset(heads(branches)))


def ensure_schema(engine: sa.Engine, storage: StorageConfig, branches: Sequence[Branch]) -> None:
    """Make sure `engine`'s database has the current schema for `branches`: upgrade it
    when `storage.auto_migrate`, else raise `StorageError` telling the operator to run
    ``portcullis db upgrade``. Refuses a database migrated by a newer version."""
    st = state(engine, branches)
    if st.ahead:
        raise StorageError(f"{storage.redacted_url()}: the schema is at {sorted(st.ahead)}, newer than this "
                           "version of Portcullis knows; upgrade Portcullis")
    if st.up_to_date:
        return
    if not storage.auto_migrate:
        raise StorageError(f"{storage.redacted_url()}: the schema is not up to date (at {sorted(st.current) or 'none'},"
                           f" want {sorted(st.heads)}); run `portcullis db upgrade`")
    upgrade(engine, branches)
