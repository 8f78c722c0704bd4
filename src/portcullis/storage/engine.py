"""The one place that turns a storage URL into a SQLAlchemy `Engine`, and the `storage:`
config section that chooses it.

Which database
--------------
`StorageConfig.url` unset (the default): every store keeps its own SQLite file in the
data directory, as before (``portcullis.db``, ``audit.db``, ``oauth.db``,
``governance.db``). Set to ``postgresql://...`` (or one ``sqlite:///file``): every store
lives in that one database, so several gateway nodes share keys, revocations, clients,
users, sessions, governance and one audit chain.

Driver: a synchronous engine, psycopg 3 for PostgreSQL
-------------------------------------------------------
DESIGN.md names SQLAlchemy 2 Core *async* with asyncpg. We use Core with a *synchronous*
engine and psycopg 3 instead, deliberately:

- Every store is synchronous today and is called from threads (the audit writer's
  thread, the key cache's poller) and from Authlib's synchronous grant code. An async
  engine would need a second, sync-over-async bridge (greenlet) for all of those callers;
  a sync engine keeps ONE code path for SQLite and PostgreSQL.
- The request path never waits on SQL: keys, revocations, clients and policy entities are
  served from in-memory caches refreshed by polling one revision integer, and audit events
  are written by a group-commit thread. So async I/O would buy nothing on the hot path.
- psycopg 3 is the maintained PostgreSQL driver with a sync API (binary wheels, server-side
  statement timeouts, pipeline mode for executemany, which the audit writer's batches use).

Connection settings
-------------------
SQLite: WAL journal, ``synchronous=FULL`` (a commit is fsynced), a busy timeout (writers in
other processes wait instead of failing). PostgreSQL: a bounded pool with pre-ping (a
connection broken by a server restart is replaced, not handed out), a connect timeout and
a server-side ``statement_timeout``/``lock_timeout`` so a stuck database fails calls
instead of hanging threads. Bound parameters are hidden from error messages (they carry
event data and key hashes).

Data directory binding
----------------------
Commands that only get a data directory (``--data-dir``) must reach the same database as
the gateway, or a key revoked by the CLI would be revoked in the wrong place. So a config
with `storage.url` *binds* its data directory: `bind_data_dir` writes ``storage.json``
(0600, beside the other secrets of that directory) and `storage_for` reads it back.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

STORAGE_MARKER = "storage.json"

Backend = Literal["sqlite", "postgresql"]


class StorageError(Exception):
    """The storage configuration or schema cannot be used; the message says what to do."""


class StorageConfig(BaseModel):
    """The `storage:` section. Every field has a safe default for one machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: one SQLite file per store in the data directory. Otherwise
    # ``postgresql://user[:password]@host[:port]/db`` (psycopg 3) or ``sqlite:///path``.
    url: str | None = None
    pool_size: int = Field(default=5, ge=1, le=100)
    max_overflow: int = Field(default=5, ge=0, le=100)
    pool_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Connections older than this are replaced (a proxy or firewall may drop idle ones).
    pool_recycle_seconds: int = Field(default=1800, ge=60, le=86400)
    connect_timeout_seconds: int = Field(default=5, ge=1, le=120)
    statement_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    busy_timeout_seconds: float = Field(default=5.0, gt=0, le=600)  # SQLite only
    # Apply pending migrations when a store opens (under a lock, so nodes may race);
    # False: refuse to start until `portcullis db upgrade` has run.
    auto_migrate: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            url = sa.make_url(v)
        except sa.exc.ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql://user@host/db)") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {url.get_backend_name()!r}: use postgresql or sqlite")
        if url.get_backend_name() == "postgresql" and url.get_driver_name() not in ("psycopg", "psycopg2", ""):
            # The stores are synchronous (see the module docstring): an async driver cannot serve them.
            raise ValueError(f"driver {url.get_driver_name()!r} is not supported: use postgresql:// (psycopg 3)")
        if url.get_backend_name() == "sqlite" and not url.database:
            raise ValueError("a SQLite URL needs a file (sqlite:////abs/path.db); in-memory databases are not shared")
        return v

    @property
    def backend(self) -> Backend:
        if self.url is None:
            return "sqlite"
        return "postgresql" if sa.make_url(self.url).get_backend_name() == "postgresql" else "sqlite"

    def redacted_url(self) -> str:
        """The URL with its password masked, for messages and logs."""
        if self.url is None:
            return "(SQLite files in the data directory)"
        return sa.make_url(self.url).render_as_string(hide_password=True)


def normalize_url(url: str | sa.URL) -> sa.URL:
    """``postgresql://`` means psycopg 3 (SQLAlchemy's bare default would be psycopg2)."""
    u = sa.make_url(url)
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("", "psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def sqlite_file_url(path: Path) -> sa.URL:
    return sa.URL.create("sqlite+pysqlite", database=str(path))


def make_engine(url: str | sa.URL, cfg: StorageConfig | None = None, *, sqlite_explicit_begin: bool = False,
                sqlite_foreign_keys: bool = False, application_name: str = "portcullis") -> sa.Engine:
    """An engine for `url` with the settings of `cfg` (defaults when None).

    `sqlite_explicit_begin`: turn off pysqlite's implicit transactions and emit ``BEGIN``
    ourselves, as ``BEGIN <mode>`` where the mode comes from the execution option
    ``portcullis_begin`` (``IMMEDIATE`` takes the write lock up front). Without it the
    driver's default transaction handling is kept (as the key and OAuth stores always had).
    """
    cfg = cfg or StorageConfig()
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, cfg, explicit_begin=sqlite_explicit_begin, foreign_keys=sqlite_foreign_keys)
    if u.get_backend_name() != "postgresql":
        raise StorageError(f"unsupported database {u.get_backend_name()!r}")
    # Options given in the URL (``?options=-csearch_path%3Dtenant1``) are kept, ours follow.
    given = u.query.get("options")
    options = ((f"{given} " if isinstance(given, str) else "") +
               f"-c statement_timeout={int(cfg.statement_timeout_seconds * 1000)} "
               f"-c lock_timeout={int(cfg.statement_timeout_seconds * 1000)} "
               # A session left "idle in transaction" (a crashed thread) must not hold locks forever.
               f"-c idle_in_transaction_session_timeout={int(max(60.0, cfg.statement_timeout_seconds * 2) * 1000)}")
    return sa.create_engine(
        u.difference_update_query(["options"]),
        pool_size=cfg.pool_size,
        max_overflow=cfg.max_overflow,
        pool_timeout=cfg.pool_timeout_seconds,
        pool_recycle=cfg.pool_recycle_seconds,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={"connect_timeout": cfg.connect_timeout_seconds, "options": options,
                      "application_name": application_name},
    )


def _sqlite_engine(u: sa.URL, cfg: StorageConfig, *, explicit_begin: bool, foreign_keys: bool) -> sa.Engine:
    busy_ms = int(cfg.busy_timeout_seconds * 1000)
    engine = sa.create_engine(
        u,
        connect_args={"timeout": cfg.busy_timeout_seconds, "check_same_thread": False},
        hide_parameters=True,
    )

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        if not isinstance(dbapi_conn, sqlite3.Connection):
            raise TypeError(f"expected a sqlite3 connection, got {type(dbapi_conn).__name__}")
        if explicit_begin:
            dbapi_conn.isolation_level = None  # `on_begin` emits BEGIN itself
        cur = dbapi_conn.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold.
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cur.execute("PRAGMA journal_mode = WAL")
            # FULL: the WAL is fsynced at every commit, so a commit is durable.
            cur.execute("PRAGMA synchronous = FULL")
            if foreign_keys:
                cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    sa.event.listen(engine, "connect", on_connect)
    if explicit_begin:
        def on_begin(conn: sa.Connection) -> None:
            mode = conn.get_execution_options().get("portcullis_begin", "DEFERRED")
            if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
                raise ValueError(f"bad SQLite BEGIN mode {mode!r}")
            conn.exec_driver_sql(f"BEGIN {mode}")

        sa.event.listen(engine, "begin", on_begin)
    return engine


def is_sqlite(engine: sa.Engine | sa.Connection) -> bool:
    return engine.dialect.name == "sqlite"


# -- data directory binding ------------------------------------------------------------


def storage_for(data_dir: Path) -> StorageConfig:
    """The storage a data directory is bound to (`bind_data_dir`), else the default."""
    marker = data_dir / STORAGE_MARKER
    try:
        raw = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return StorageConfig()
    try:
        return StorageConfig.model_validate(json.loads(raw))
    except ValueError as exc:
        raise StorageError(f"{marker}: unreadable storage binding ({exc}); fix or remove it") from None


def bind_data_dir(data_dir: Path, cfg: StorageConfig | None) -> StorageConfig:
    """Record which database `data_dir`'s stores live in, and return the storage to use.

    `cfg` None (no `storage:` section): whatever the directory is bound to. A config with
    `url` writes the binding (0600). A config without `url` on a directory bound to an
    external database is refused: the stores would silently split between two places.
    """
    current = storage_for(data_dir)
    if cfg is None:
        return current
    if cfg.url is None:
        if current.url is not None:
            raise StorageError(f"{data_dir} is bound to {current.redacted_url()} ({STORAGE_MARKER}); set "
                               "storage.url to it, or remove the file to go back to SQLite files")
        return cfg
    if cfg != current:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker = data_dir / STORAGE_MARKER
        tmp = marker.with_suffix(".tmp")
        # The URL may carry a password: born 0600, replaced atomically.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cfg.model_dump(), f, sort_keys=True)
        os.replace(tmp, marker)
    return cfg


def external_engine(data_dir: Path, *, sqlite_explicit_begin: bool = False,
                    sqlite_foreign_keys: bool = False) -> tuple[sa.Engine, StorageConfig] | None:
    """The shared database's engine when `data_dir` is bound to one, else None (the store
    uses its own SQLite file in the directory, as it always did)."""
    storage = storage_for(data_dir)
    if storage.url is None:
        return None
    return make_engine(storage.url, storage, sqlite_explicit_begin=sqlite_explicit_begin,
                       sqlite_foreign_keys=sqlite_foreign_keys), storage
