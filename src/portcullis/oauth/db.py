"""The authorization server's store: one SQLite file, or the shared database the data
directory is bound to (PostgreSQL; see `portcullis.storage.engine`). SQLAlchemy 2 Core.

Every module of `oauth/` declares its tables on `metadata`; `AuthDb` creates them all on
SQLite (import the modules first — `service.build_auth_server` does); on a shared
database the ``oauth`` migrations own the schema. Core, not ORM: the hot paths (client
lookup, token issue) are single statements or served from caches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portcullis.storage.engine import StorageConfig, external_engine, make_engine, sqlite_file_url

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    # "optional" | "required" (any second factor) | "phishing_resistant" (passkeys only)
    sa.Column("mfa_policy", sa.String(32), nullable=False, default="optional"),
    sa.Column("created_at", sa.Float, nullable=False),
)

clients = sa.Table(
    "oauth_clients", metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("tenant", sa.String(100), nullable=False),
    # HMAC-SHA256 of the secret under the data directory's pepper (never the secret).
    sa.Column("secret_hash", sa.String(64), nullable=True),
    sa.Column("auth_method", sa.String(64), nullable=False),
    sa.Column("grant_types", sa.Text, nullable=False),      # JSON list
    sa.Column("redirect_uris", sa.Text, nullable=False),    # JSON list
    sa.Column("scopes", sa.Text, nullable=False),           # JSON list
    sa.Column("jwks", sa.Text, nullable=True),              # JSON JWKS (private_key_jwt, self-signed TLS)
    sa.Column("tls_subject_dn", sa.Text, nullable=True),    # tls_client_auth (RFC 8705 §2.1.2)
    sa.Column("require_par", sa.Boolean, nullable=False, default=False),
    sa.Column("require_dpop", sa.Boolean, nullable=False, default=False),
    # First-party clients skip the consent screen; third-party clients never do.
    sa.Column("first_party", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

revision = sa.Table(
    "oauth_revision", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
)


class AuthDb:
    """The engine over `path` (0600, created with every table on `metadata`), or over the
    shared database when `path`'s directory (the data directory) is bound to one, or over
    `engine` when given (tests, tools).

    Safe to share between threads and processes (SQLite WAL, busy timeout; PostgreSQL
    row locks). `bump()` increments one revision counter on every change to clients or
    tenants, so caches in other processes notice with one integer read.
    """

    def __init__(self, path: Path, *, engine: sa.Engine | None = None,
                 storage: StorageConfig | None = None) -> None:
        self.path = path
        if engine is None and (bound := external_engine(path.parent, sqlite_foreign_keys=True)) is not None:
            engine, storage = bound
        if engine is not None:
            from portcullis.storage.migrations import ensure_schema

            self.engine = engine
            ensure_schema(engine, storage or StorageConfig(), ["oauth"])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            self.engine = make_engine(sqlite_file_url(path), storage, sqlite_foreign_keys=True)
            metadata.create_all(self.engine)
            if new:
                os.chmod(path, 0o600)
        try:
            with self.engine.begin() as conn:
                if conn.execute(sa.select(revision.c.revision)).first() is None:
                    conn.execute(revision.insert().values(id=1, revision=0))
        except IntegrityError:
            pass  # another process inserted the row first

    @contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A transaction: committed on success, rolled back on any error (no half-written state)."""
        with self.engine.begin() as conn:
            yield conn

    def bump(self, conn: sa.Connection) -> None:
        conn.execute(revision.update().values(revision=revision.c.revision + 1))

    def revision(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(revision.c.revision)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def loads_list(v: str | None) -> list[str]:
    return [str(x) for x in json.loads(v)] if v else []
