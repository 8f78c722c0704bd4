"""The authorization server's store: one SQLite file (SQLAlchemy 2 Core).

Every module of `oauth/` declares its tables on `metadata`; `AuthDb` creates them all
(import the modules first — `service.build_auth_server` does). Core, not ORM: the hot
paths (client lookup, token issue) are single statements or served from caches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

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


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class AuthDb:
    """The engine over `path` (0600, created with every table on `metadata`).

    Safe to share between threads and processes (SQLite WAL, busy timeout). `bump()`
    increments one revision counter on every change to clients or tenants, so caches in
    other processes notice with one integer read.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self.path = path
        self.engine = sa.create_engine(f"sqlite:///{path}", future=True)
        sa.event.listen(self.engine, "connect", _on_connect)
        metadata.create_all(self.engine)
        if new:
            os.chmod(path, 0o600)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(revision.c.revision)).first() is None:
                conn.execute(revision.insert().values(id=1, revision=0))

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
