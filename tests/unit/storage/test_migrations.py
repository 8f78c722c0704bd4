"""Alembic migrations: an empty database gets the whole schema; a populated one (SQLite
files made by the earlier `create_all` code; PostgreSQL at an older revision) upgrades in
place, keeping its rows; the result matches the code's tables exactly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.events import AuditEvent
from portcullis.audit.sqlite import SqlAuditStore
from portcullis.audit.verify import verify
from portcullis.governance.store import GovernanceStore
from portcullis.oauth.db import AuthDb
from portcullis.storage.engine import StorageConfig, StorageError, make_engine, sqlite_file_url
from portcullis.storage.migrations import (
    DEFAULT_FILES,
    diff,
    ensure_schema,
    heads,
    state,
    upgrade,
    upgrade_to,
)
from portcullis.storage.protocols import ApiKeyRecord, RevocationRecord
from portcullis.storage.sqlite_keys import SqlKeyStore
from tests.unit.storage.backends import PgDatabase

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def record(key_id: str = "k1", **kw: object) -> ApiKeyRecord:
    return ApiKeyRecord(key_id=key_id, name=f"n-{key_id}", tenant="acme", scopes=frozenset({"a"}),
                        roles=frozenset(), key_hash="h" * 64, created_at=1.0, **kw)  # type: ignore[arg-type]


def test_empty_sqlite_database_gets_every_table(tmp_path: Path) -> None:
    engine = make_engine(sqlite_file_url(tmp_path / "all.db"))
    try:
        upgrade(engine)
        assert state(engine).up_to_date and state(engine).current == heads()
        assert diff(engine) == []
        upgrade(engine)  # idempotent
        assert state(engine).current == heads()
    finally:
        engine.dispose()


def test_sqlite_files_made_by_create_all_upgrade_in_place(tmp_path: Path) -> None:
    """The default layout, populated by the stores' own create_all code, then upgraded."""
    from portcullis.oauth import authorize, identity, tokens  # noqa: F401 - declare the oauth tables

    keys = SqlKeyStore(tmp_path / DEFAULT_FILES["keys"])
    keys.create(record(signing_key_id="sig"))
    keys.revoke_tokens(RevocationRecord("jti", "t1", 1.0, None))
    keys.close()
    with SqlAuditStore(tmp_path / DEFAULT_FILES["audit"], signing_key=KEY) as audit:
        audit.append_batch([AuditEvent(ts=1.0, kind="request", request_id="r1", decision="allow", reason="ok")])
    AuthDb(tmp_path / DEFAULT_FILES["oauth"]).close()
    GovernanceStore(tmp_path / DEFAULT_FILES["governance"]).close()

    for branch, name in DEFAULT_FILES.items():
        engine = make_engine(sqlite_file_url(tmp_path / name))
        try:
            upgrade(engine, [branch])
            assert state(engine, [branch]).up_to_date
            assert diff(engine, [branch]) == [], branch
        finally:
            engine.dispose()
    keys = SqlKeyStore(tmp_path / DEFAULT_FILES["keys"])
    got = keys.get("k1")
    assert got is not None and got.signing_key_id == "sig"
    assert [r.value for r in keys.revocations(2.0)] == ["t1"]
    keys.close()
    with SqlAuditStore(tmp_path / DEFAULT_FILES["audit"], verify_key=KEY.public_key()) as audit:
        assert verify(audit, KEY.public_key()).ok


def test_key_store_from_before_signing_keys_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "portcullis.db"
    conn = sqlite3.connect(path)  # the schema of the first release: no signing_key_id
    conn.executescript("""
        CREATE TABLE api_keys (key_id VARCHAR(16) NOT NULL, name VARCHAR(200) NOT NULL,
            tenant VARCHAR(200) NOT NULL, scopes TEXT NOT NULL, roles TEXT NOT NULL, key_hash VARCHAR(64) NOT NULL,
            created_at FLOAT NOT NULL, expires_at FLOAT, revoked_at FLOAT, rate_limit TEXT,
            PRIMARY KEY (key_id), UNIQUE (name));
        INSERT INTO api_keys VALUES ('old', 'legacy', 'acme', '[]', '[]', 'x', 1.0, NULL, NULL, NULL);
    """)
    conn.close()
    engine = make_engine(sqlite_file_url(path))
    try:
        upgrade(engine, ["keys"])
        assert diff(engine, ["keys"]) == []
    finally:
        engine.dispose()
    store = SqlKeyStore(path)
    got = store.get("old")
    assert got is not None and got.name == "legacy" and got.signing_key_id is None
    store.close()


def test_refuses_to_start_behind_without_auto_migrate(tmp_path: Path) -> None:
    engine = make_engine(sqlite_file_url(tmp_path / "x.db"))
    try:
        with pytest.raises(StorageError, match="portcullis db upgrade"):
            ensure_schema(engine, StorageConfig(auto_migrate=False), ["keys"])
        ensure_schema(engine, StorageConfig(), ["keys"])
        ensure_schema(engine, StorageConfig(auto_migrate=False), ["keys"])  # now current: fine
    finally:
        engine.dispose()


def test_refuses_a_database_migrated_by_a_newer_version(tmp_path: Path) -> None:
    engine = make_engine(sqlite_file_url(tmp_path / "x.db"))
    try:
        upgrade(engine, ["keys"])
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE portcullis_alembic_version SET version_num = 'keys_9999'")
        with pytest.raises(StorageError, match="newer"):
            ensure_schema(engine, StorageConfig(), ["keys"])
    finally:
        engine.dispose()


@pytest.mark.services
def test_postgresql_empty_then_populated_older_revision_upgrades(pg_database: PgDatabase) -> None:
    schema = pg_database.schema()
    engine = schema.engine()
    try:
        upgrade_to(engine, "keys_0001")  # an older key store, with a key in it
        assert state(engine, ["keys"]).current == {"keys_0001"}
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO api_keys (key_id, name, tenant, scopes, roles, key_hash, created_at) "
                                 "VALUES ('old', 'legacy', 'acme', '[]', '[]', 'x', 1.0)"))
        upgrade(engine)
        assert state(engine).current == heads()
        assert diff(engine) == []
        store = SqlKeyStore(engine)
        got = store.get("old")
        assert got is not None and got.name == "legacy" and got.signing_key_id is None
        store.create(record("new", signing_key_id="sig"))
        got = store.get("new")
        assert got is not None and got.signing_key_id == "sig"
        store.close()
    finally:
        engine.dispose()
        pg_database.drop(schema)


@pytest.mark.services
def test_postgresql_concurrent_upgrades_run_once(pg_database: PgDatabase) -> None:
    import threading

    schema = pg_database.schema()
    engines = [schema.engine() for _ in range(3)]
    errors: list[BaseException] = []

    def run(e: sa.Engine) -> None:
        try:
            upgrade(e)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert state(engines[0]).current == heads()
    finally:
        for e in engines:
            e.dispose()
        pg_database.drop(schema)
