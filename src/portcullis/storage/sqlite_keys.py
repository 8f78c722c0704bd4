"""The API key and token revocation store on SQLite or PostgreSQL (SQLAlchemy 2 Core).

`SqlKeyStore(path)`: its own SQLite file (the default layout). `SqlKeyStore(engine)`: a
shared database from `portcullis.storage.engine`, whose schema Alembic manages
(`portcullis.storage.migrations`, branch ``keys``). The SQL is the same on both.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portcullis.storage.engine import StorageConfig, make_engine, sqlite_file_url
from portcullis.storage.protocols import ApiKeyRecord, KeyExistsError, RateLimitSpec, RevocationRecord

metadata = _meta = sa.MetaData()  # `metadata`: the tables, for migrations
api_keys = sa.Table(
    "api_keys",
    _meta,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("tenant", sa.String(200), nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("rate_limit", sa.Text, nullable=True),
    sa.Column("signing_key_id", sa.String(256), nullable=True),
)
revocations_table = sa.Table(
    "token_revocations",
    _meta,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("value", sa.String(512), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
)
revision_table = sa.Table(
    "store_revision",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
)


class SqlKeyStore:
    """`KeyStore` and `RevocationStore` in one database; safe to use from several threads
    and processes (and nodes, on PostgreSQL). One revision counter covers both, so one poll
    sees every change.

    `target`: a SQLite file path (created 0600 with its tables, as always), or an engine
    on a shared database, whose schema is brought up to date (or checked, see
    `StorageConfig.auto_migrate`) with the ``keys`` migrations.
    """

    def __init__(self, target: Path | sa.Engine, storage: StorageConfig | None = None) -> None:
        if isinstance(target, sa.Engine):
            from portcullis.storage.migrations import ensure_schema

            self._engine = target
            ensure_schema(target, storage or StorageConfig(), ["keys"])
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            new = not target.exists()
            self._engine = make_engine(sqlite_file_url(target), storage)
            _meta.create_all(self._engine)
            self._migrate()
            if new:
                os.chmod(target, 0o600)
        try:
            with self._engine.begin() as conn:
                if conn.execute(sa.select(revision_table.c.revision)).first() is None:
                    conn.execute(revision_table.insert().values(id=1, revision=0))
        except IntegrityError:
            pass  # another process inserted the row first

    def _migrate(self) -> None:
        """Additive changes for SQLite files made by earlier versions (`portcullis db
        upgrade` does the same through Alembic, revision keys_0002)."""
        with self._engine.begin() as conn:
            cols = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(api_keys)")}
            if "signing_key_id" not in cols:
                conn.exec_driver_sql("ALTER TABLE api_keys ADD COLUMN signing_key_id VARCHAR(256)")

    @staticmethod
    def _row(row: sa.Row[Any]) -> ApiKeyRecord:
        rl = json.loads(row.rate_limit) if row.rate_limit else None
        return ApiKeyRecord(
            key_id=row.key_id,
            name=row.name,
            tenant=row.tenant,
            scopes=frozenset(json.loads(row.scopes)),
            roles=frozenset(json.loads(row.roles)),
            key_hash=row.key_hash,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            rate_limit=RateLimitSpec(rl["requests"], rl["per_seconds"], rl["burst"]) if rl else None,
            signing_key_id=row.signing_key_id,
        )

    @staticmethod
    def _bump(conn: sa.Connection) -> None:
        conn.execute(revision_table.update().values(revision=revision_table.c.revision + 1))

    def create(self, record: ApiKeyRecord) -> None:
        rl = record.rate_limit
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    api_keys.insert().values(
                        key_id=record.key_id,
                        name=record.name,
                        tenant=record.tenant,
                        scopes=json.dumps(sorted(record.scopes)),
                        roles=json.dumps(sorted(record.roles)),
                        key_hash=record.key_hash,
                        created_at=record.created_at,
                        expires_at=record.expires_at,
                        revoked_at=record.revoked_at,
                        rate_limit=json.dumps(
                            {"requests": rl.requests, "per_seconds": rl.per_seconds, "burst": rl.burst}
                        )
                        if rl
                        else None,
                        signing_key_id=record.signing_key_id,
                    )
                )
                self._bump(conn)
        except IntegrityError as exc:
            raise KeyExistsError(f"a key with id {record.key_id!r} or name {record.name!r} exists") from exc

    def get(self, key_id: str) -> ApiKeyRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id)).first()
        return self._row(row) if row else None

    def list(self) -> list[ApiKeyRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at)).all()
        return [self._row(r) for r in rows]

    def revoke(self, key_id: str, at: float) -> bool:
        with self._engine.begin() as conn:
            res = conn.execute(
                api_keys.update()
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            if res.rowcount != 1:
                return False
            self._bump(conn)
        return True

    def revoke_tokens(self, record: RevocationRecord) -> bool:
        t = revocations_table.c
        try:
            with self._engine.begin() as conn:
                # A lapsed revocation of the same token may be made again.
                conn.execute(revocations_table.delete().where(
                    t.kind == record.kind, t.value == record.value, t.expires_at.is_not(None),
                    t.expires_at <= record.created_at))
                conn.execute(revocations_table.insert().values(
                    kind=record.kind, value=record.value, created_at=record.created_at,
                    expires_at=record.expires_at, reason=record.reason,
                ))
                self._bump(conn)
        except IntegrityError:
            return False
        return True

    def revocations(self, now: float) -> builtins.list[RevocationRecord]:  # `list` is a method here
        t = revocations_table.c
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(revocations_table).where(
                sa.or_(t.expires_at.is_(None), t.expires_at > now))).all()
        return [RevocationRecord(r.kind, r.value, r.created_at, r.expires_at, r.reason) for r in rows]

    def revision(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(revision_table.c.revision)).scalar_one())

    def close(self) -> None:
        self._engine.dispose()


SqliteKeyStore = SqlKeyStore  # the name earlier code imports
