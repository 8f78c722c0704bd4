"""`AuditStore` on SQLite or PostgreSQL, via SQLAlchemy Core (one set of tables and
queries for both).

Durability: SQLite runs a WAL journal with ``synchronous=FULL``; PostgreSQL commits with
``synchronous_commit=on`` (forced per transaction, whatever the server default), so a
committed batch is on disk before `append_batch` returns.

One linear chain however many writers: an append must read the head and insert after it
with nobody else appending in between. SQLite: ``BEGIN IMMEDIATE`` takes the single write
lock up front. PostgreSQL: the transaction first takes ``LOCK TABLE events IN EXCLUSIVE
MODE``, which blocks other appenders (on every node) but not readers, until commit.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portcullis.audit.chain import (
    FLOAT_FIELDS,
    GENESIS_HASH,
    INT_FIELDS,
    STR_FIELDS,
    chain_hash,
    checkpoint_message,
    encode_extra,
    normalize_event,
)
from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import key_id
from portcullis.audit.store import AuditStoreError, ChainHead, Checkpoint, CorruptEventError
from portcullis.storage.engine import StorageConfig, make_engine, sqlite_file_url

SCHEMA_VERSION = 1

metadata = sa.MetaData()
# 64-bit on PostgreSQL (a busy gateway passes 2**31 events in days); plain INTEGER on
# SQLite, where it is already 64-bit and INTEGER PRIMARY KEY makes `seq` the rowid.
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events_table = sa.Table(
    "events",
    metadata,
    # INTEGER PRIMARY KEY: SQLite's rowid, always an integer, assigned by us (not autoincrement).
    sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.Float, nullable=False),
    *(sa.Column(name, sa.Text, nullable=False) for name in STR_FIELDS),
    *(sa.Column(name, BigInt, nullable=False) for name in INT_FIELDS),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("extra", sa.Text, nullable=False),  # canonical JSON (chain.encode_extra)
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_events_request_id", "request_id"),
    sa.Index("ix_events_ts", "ts"),
)

checkpoints_table = sa.Table(
    "checkpoints",
    metadata,
    # Own id rather than seq as the key: if the tail is ever truncated and re-appended,
    # the old checkpoints stay as evidence instead of blocking inserts or being replaced.
    sa.Column("id", BigInt, primary_key=True, autoincrement=True),
    sa.Column("seq", BigInt, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
    sa.Index("ix_checkpoints_seq", "seq", "id"),
)

_EVENT_COLUMNS: tuple[str, ...] = (
    "seq", *FLOAT_FIELDS, *STR_FIELDS, *INT_FIELDS, "extra", "prev_hash", "hash",
)
_MAX_ROWID = 2**63 - 1
# Rows go to the driver's executemany as tuples: SQLAlchemy's per-row parameter
# processing costs more than the insert itself on the audit hot path.
_row_getter = operator.attrgetter(*_EVENT_COLUMNS)
_EXTRA_INDEX = _EVENT_COLUMNS.index("extra")

def _insert_events_sql(paramstyle: str) -> str:
    """The driver-level INSERT (fixed column names, bound values: no injection vector)."""
    mark = "?" if paramstyle == "qmark" else "%s"  # sqlite3: qmark; psycopg: format/pyformat
    return f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES ({', '.join(mark for _ in _EVENT_COLUMNS)})"  # noqa: S608


_INSERT_EVENTS = _insert_events_sql("qmark")


def _decode_text(raw: bytes) -> str:
    # A TEXT value that is not valid UTF-8 can only come from outside this code (we
    # store valid UTF-8); decode it losslessly so verification reports a hash mismatch
    # at that seq instead of the whole read failing.
    return raw.decode("utf-8", "surrogateescape")


def _as_str(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


def _decode_event(m: sa.RowMapping) -> AuditEvent:
    """A stored row as an event, with no coercion that could hide tampering.

    Raises CorruptEventError if a column holds a value of the wrong type.
    """
    seq = m["seq"]
    kwargs: dict[str, Any] = {}
    for name in FLOAT_FIELDS:
        v = m[name]
        # REAL affinity turns stored integers back into floats, so anything else is foreign.
        if not isinstance(v, float):
            raise CorruptEventError(seq, f"{name} is {type(v).__name__}, not float")
        kwargs[name] = v
    for name in INT_FIELDS:
        v = m[name]
        if not isinstance(v, int) or isinstance(v, bool):
            raise CorruptEventError(seq, f"{name} is {type(v).__name__}, not int")
        kwargs[name] = v
    for name in (*STR_FIELDS, "prev_hash", "hash"):
        v = m[name]
        if not isinstance(v, str):
            raise CorruptEventError(seq, f"{name} is {type(v).__name__}, not text")
        kwargs[name] = v
    raw_extra = m["extra"]
    if not isinstance(raw_extra, str):
        raise CorruptEventError(seq, f"extra is {type(raw_extra).__name__}, not text")
    try:
        extra = json.loads(raw_extra)
    except (ValueError, RecursionError):
        raise CorruptEventError(seq, "extra is not valid JSON") from None
    if not isinstance(extra, dict):
        raise CorruptEventError(seq, "extra is not a JSON object")
    return AuditEvent(seq=seq, extra=extra, **kwargs)


def _decode_checkpoint(m: sa.RowMapping) -> Checkpoint:
    # Lenient on purpose: a wrongly typed value becomes something that fails signature
    # verification (and is reported) rather than an exception that stops verification.
    ts = m["ts"]
    return Checkpoint(
        seq=int(m["seq"]),
        hash=_as_str(m["hash"]),
        ts=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else math.nan,
        signature=_as_str(m["signature"]),
        key_id=_as_str(m["key_id"]),
    )


class SqlAuditStore:
    """The audit log in SQLite or PostgreSQL; implements `portcullis.audit.store.AuditStore`.

    `target`: a SQLite file path (the default layout), or an engine on a shared database
    (`portcullis.storage.engine.make_engine`), whose schema the ``audit`` migrations manage.

    With a `signing_key` the store can append: a SQLite file, its directory (0700) and the
    schema are created if absent, the file with mode 0600; a shared database is migrated
    (or checked, `storage.auto_migrate`). Without one it is read-only (for `audit
    tail`/`audit verify`): nothing is created, and `append_batch` raises AuditStoreError.
    `verify_key` defaults to the signing key's public half; if both are given they must
    match. Safe to share between threads.
    """

    def __init__(
        self,
        target: Path | sa.Engine,
        signing_key: Ed25519PrivateKey | None = None,
        verify_key: Ed25519PublicKey | None = None,
        *,
        busy_timeout: float = 10.0,
        page_size: int = 1000,
        storage: StorageConfig | None = None,
    ) -> None:
        if signing_key is not None:
            derived = signing_key.public_key()
            if verify_key is not None and verify_key != derived:
                raise ValueError("verify_key is not the public key of signing_key")
            verify_key = derived
        self._signing_key = signing_key
        self._verify_key = verify_key
        self._key_id = key_id(signing_key.public_key()) if signing_key is not None else ""
        self._page = max(1, page_size)
        if isinstance(target, sa.Engine):
            self._path = Path(target.url.render_as_string(hide_password=True))
            self._engine = target
            self._write_engine = target
            self._sqlite = target.dialect.name == "sqlite"
            self._insert_sql = _insert_events_sql(target.dialect.paramstyle)
            try:
                self._prepare_shared(writable=signing_key is not None, storage=storage or StorageConfig())
            except BaseException:
                self._engine.dispose()
                raise
            return
        path = target
        self._path = path
        self._sqlite = True
        self._insert_sql = _INSERT_EVENTS
        if signing_key is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file ourselves so it is born 0600; SQLite gives the -wal and
            # -shm files the same mode as the database.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no audit database")

        self._engine = make_engine(sqlite_file_url(path), StorageConfig(busy_timeout_seconds=busy_timeout),
                                   sqlite_explicit_begin=True)

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Runs after the engine's own pragmas (WAL, synchronous=FULL, busy timeout).
            if not isinstance(dbapi_conn, sqlite3.Connection):
                raise TypeError(f"expected a sqlite3 connection, got {type(dbapi_conn).__name__}")
            dbapi_conn.text_factory = _decode_text
            cur = dbapi_conn.cursor()
            try:
                mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise AuditStoreError(f"{path}: cannot use WAL journal mode (got {mode!r})")
                cur.execute("PRAGMA fullfsync = ON")  # macOS: F_FULLFSYNC; no-op elsewhere
            finally:
                cur.close()

        sa.event.listen(self._engine, "connect", on_connect)
        # IMMEDIATE takes the write lock at BEGIN, so the head we read cannot go stale.
        self._write_engine = self._engine.execution_options(portcullis_begin="IMMEDIATE")
        try:
            self._prepare_schema(writable=signing_key is not None)
        except BaseException:
            self._engine.dispose()
            raise

    def _prepare_schema(self, *, writable: bool) -> None:
        """The default layout's own file: create the tables once, versioned by
        ``PRAGMA user_version`` (``portcullis db upgrade`` adds Alembic's version on top)."""
        engine = self._write_engine if writable else self._engine
        with engine.begin() as conn:
            version = int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())
            if version > SCHEMA_VERSION:
                raise AuditStoreError(f"{self._path}: audit schema {version} is newer than this code")
            if version == SCHEMA_VERSION:
                return
            if not writable:
                raise AuditStoreError(f"{self._path}: not a Portcullis audit database")
            for table in metadata.sorted_tables:
                conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
                for index in table.indexes:
                    conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _prepare_shared(self, *, writable: bool, storage: StorageConfig) -> None:
        from portcullis.storage.migrations import ensure_schema

        if writable:
            ensure_schema(self._engine, storage, ["audit"])
        elif not sa.inspect(self._engine).has_table("events"):
            raise AuditStoreError(f"{self._path}: not a Portcullis audit database (no events table)")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def verify_key(self) -> Ed25519PublicKey | None:
        """The key checkpoints are expected to be signed with, if known."""
        return self._verify_key

    def append_batch(self, events: list[AuditEvent], *, assume_normalized: bool = False) -> list[AuditEvent]:
        """See `AuditStore.append_batch`. One transaction, one checkpoint per call.

        `assume_normalized`: the caller (the `AuditWriter`) has already run
        `normalize_event` on every event, so it is not repeated here.
        """
        if not events:
            return events
        if self._signing_key is None:
            raise AuditStoreError("audit store opened without a signing key is read-only")
        if not assume_normalized:
            for ev in events:
                normalize_event(ev)
        e = events_table.c
        try:
            with self._write_engine.begin() as conn:
                if not self._sqlite:
                    # Durable whatever the server's default; one appender at a time (see module doc).
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
                    conn.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE")
                head = conn.execute(sa.select(e.seq, e.hash).order_by(e.seq.desc()).limit(1)).first()
                seq, prev = (int(head[0]), _as_str(head[1])) if head is not None else (0, GENESIS_HASH)
                rows: list[tuple[Any, ...]] = []
                for ev in events:
                    seq += 1
                    ev.seq = seq
                    ev.prev_hash = prev
                    extra_json = encode_extra(ev.extra)
                    ev.hash = prev = chain_hash(prev, ev, extra_json)
                    row = list(_row_getter(ev))
                    row[_EXTRA_INDEX] = extra_json
                    rows.append(tuple(row))
                conn.exec_driver_sql(self._insert_sql, rows)
                cp_ts = round(time.time(), 6)
                signature = self._signing_key.sign(checkpoint_message(seq, prev, cp_ts)).hex()
                conn.execute(sa.insert(checkpoints_table).values(
                    seq=seq, hash=prev, ts=cp_ts, key_id=self._key_id, signature=signature,
                ))
        except BaseException:
            # Not stored: clear the chain fields so nobody mistakes them for real ones.
            for ev in events:
                ev.seq, ev.prev_hash, ev.hash = 0, "", ""
            raise
        return events

    def iter_events(self, after_seq: int = 0, limit: int | None = None) -> Iterator[AuditEvent]:
        """See `AuditStore.iter_events`; reads pages of `page_size` rows by seq."""
        remaining = limit
        cursor = after_seq
        e = events_table.c
        cols = [e[name] for name in _EVENT_COLUMNS]
        while remaining is None or remaining > 0:
            n = self._page if remaining is None else min(self._page, remaining)
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(*cols).where(e.seq > cursor).order_by(e.seq).limit(n)).all()
            for row in rows:
                cursor = int(row._mapping["seq"])
                yield _decode_event(row._mapping)
            if len(rows) < n:
                return
            if remaining is not None:
                remaining -= len(rows)

    def tail(self, n: int) -> list[AuditEvent]:
        """See `AuditStore.tail`."""
        if n <= 0:
            return []
        e = events_table.c
        cols = [e[name] for name in _EVENT_COLUMNS]
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(*cols).order_by(e.seq.desc()).limit(n)).all()
        return [_decode_event(row._mapping) for row in reversed(rows)]

    def head(self) -> ChainHead:
        """See `AuditStore.head`; both reads happen in one read transaction (snapshot)."""
        e = events_table.c
        c = checkpoints_table.c
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(e.seq, e.hash).order_by(e.seq.desc()).limit(1)).first()
            q = sa.select(sa.func.max(c.seq))
            if self._sqlite:  # SQLite columns take any type; a tampered row must not count
                q = q.where(sa.func.typeof(c.seq) == "integer")
            cp_seq = conn.execute(q).scalar()
        seq, hash_ = (int(row[0]), _as_str(row[1])) if row is not None else (0, GENESIS_HASH)
        return ChainHead(seq=seq, hash=hash_, checkpoint_seq=int(cp_seq or 0))

    def checkpoints(self, after_seq: int = 0, limit: int | None = None) -> Iterator[Checkpoint]:
        """See `AuditStore.checkpoints`. Rows whose seq is not an integer are skipped."""
        c = checkpoints_table.c
        cursor: tuple[int, int] = (after_seq, _MAX_ROWID)  # (seq, id) keyset
        remaining = limit
        while remaining is None or remaining > 0:
            n = self._page if remaining is None else min(self._page, remaining)
            query = sa.select(c.id, c.seq, c.hash, c.ts, c.key_id, c.signature)
            if self._sqlite:
                query = query.where(sa.func.typeof(c.seq) == "integer")
            query = (
                query.where(sa.tuple_(c.seq, c.id) > sa.tuple_(sa.literal(cursor[0]), sa.literal(cursor[1])))
                .order_by(c.seq, c.id)
                .limit(n)
            )
            with self._engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                cursor = (int(row._mapping["seq"]), int(row._mapping["id"]))
                yield _decode_checkpoint(row._mapping)
            if len(rows) < n:
                return
            if remaining is not None:
                remaining -= len(rows)

    def pragmas(self) -> dict[str, str]:
        """Diagnostics (SQLite): journal_mode, synchronous and busy_timeout as a connection sees them."""
        if not self._sqlite:
            raise AuditStoreError("pragmas are a SQLite diagnostic")
        with self._engine.connect() as conn:
            return {
                name: str(conn.exec_driver_sql(f"PRAGMA {name}").scalar_one())
                for name in ("journal_mode", "synchronous", "busy_timeout")
            }

    def close(self) -> None:
        """Close all pooled connections. Idempotent."""
        self._engine.dispose()

    def __enter__(self) -> SqlAuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_event(ev: AuditEvent) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(ev, name) for name in _EVENT_COLUMNS if name != "extra"}
    row["extra"] = encode_extra(ev.extra)
    return row


SqliteAuditStore = SqlAuditStore  # the name earlier code imports
