"""Backends for the storage contract suite: memory, SQLite and PostgreSQL (real servers).

PostgreSQL: one fresh schema per test run in the shared server's database ``test``
(migrated with Alembic, as an operator would), emptied before each test and dropped at
the end. Tests that need it skip, saying why, when the server is not reachable.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.chain import GENESIS_HASH, chain_hash, checkpoint_message, encode_extra, normalize_event
from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import key_id
from portcullis.audit.store import ChainHead, Checkpoint
from portcullis.storage.engine import StorageConfig, make_engine

PG_URL = os.environ.get("PORTCULLIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_reachable() -> str | None:
    """None if the shared PostgreSQL answers, else why not."""
    try:
        engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"),
                                  connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is not reachable ({type(exc).__name__})"
    return None


@dataclass
class PgSchema:
    """A throwaway schema in the shared database; `url` puts connections in it."""

    name: str
    url: str
    admin: sa.Engine

    def engine(self, **cfg: object) -> sa.Engine:
        return make_engine(self.url, StorageConfig.model_validate(cfg))

    def truncate(self) -> None:
        with self.admin.connect() as conn:
            tables = [r[0] for r in conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'portcullis_alembic_version'",
                (self.name,))]
            if tables:
                conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{self.name}"."{t}"' for t in tables) + " CASCADE")
            conn.commit()


@dataclass
class PgDatabase:
    """A connection to the shared server for making throwaway schemas."""

    admin: sa.Engine

    def schema(self) -> PgSchema:
        name = f"t_{secrets.token_hex(6)}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
            conn.commit()
        sep = "&" if "?" in PG_URL else "?"
        return PgSchema(name, f"{PG_URL}{sep}options=-csearch_path%3D{name}", self.admin)

    def drop(self, schema: PgSchema) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema.name}" CASCADE')
            conn.commit()


class MemoryAuditStore:
    """An `AuditStore` in lists: the chain and checkpoints exactly as the protocol says
    (a real implementation for the contract suite, not a mock)."""

    def __init__(self, signing_key: Ed25519PrivateKey) -> None:
        self._key = signing_key
        self._events: list[AuditEvent] = []
        self._checkpoints: list[Checkpoint] = []

    def append_batch(self, events: list[AuditEvent], *, assume_normalized: bool = False) -> list[AuditEvent]:
        if not events:
            return events
        if not assume_normalized:
            for ev in events:
                normalize_event(ev)
        seq, prev = (self._events[-1].seq, self._events[-1].hash) if self._events else (0, GENESIS_HASH)
        for ev in events:
            seq += 1
            ev.seq, ev.prev_hash = seq, prev
            ev.hash = prev = chain_hash(prev, ev, encode_extra(ev.extra))
        self._events.extend(events)
        ts = round(time.time(), 6)
        self._checkpoints.append(Checkpoint(seq, prev, ts, self._key.sign(checkpoint_message(seq, prev, ts)).hex(),
                                            key_id(self._key.public_key())))
        return events

    def iter_events(self, after_seq: int = 0, limit: int | None = None) -> Iterator[AuditEvent]:
        out = [e for e in self._events if e.seq > after_seq]
        return iter(out if limit is None else out[:limit])

    def tail(self, n: int) -> list[AuditEvent]:
        return self._events[-n:] if n > 0 else []

    def head(self) -> ChainHead:
        seq, h = (self._events[-1].seq, self._events[-1].hash) if self._events else (0, GENESIS_HASH)
        return ChainHead(seq, h, max((c.seq for c in self._checkpoints), default=0))

    def checkpoints(self, after_seq: int = 0, limit: int | None = None) -> Iterator[Checkpoint]:
        out = [c for c in self._checkpoints if c.seq > after_seq]
        return iter(out if limit is None else out[:limit])

    def close(self) -> None:
        pass
