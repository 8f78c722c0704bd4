"""One contract suite for the stores, run against every backend: memory, SQLite and
PostgreSQL (a real server; skipped, saying why, when it is not reachable)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.events import AuditEvent
from portcullis.audit.sqlite import SqlAuditStore
from portcullis.audit.store import AuditStore
from portcullis.audit.verify import verify
from portcullis.storage.protocols import ApiKeyRecord, KeyExistsError, RateLimitSpec, RevocationRecord
from portcullis.storage.sqlite_keys import SqlKeyStore
from tests.support import MemoryKeyStore
from tests.unit.storage.backends import MemoryAuditStore, PgSchema

BACKENDS = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.services)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    if request.param == "postgresql":
        return "postgresql", request.getfixturevalue("fresh_pg")
    return request.param, tmp_path


def _key_store(backend: tuple[str, Any]) -> Any:
    kind, where = backend
    if kind == "memory":
        return MemoryKeyStore()
    if kind == "sqlite":
        return SqlKeyStore(where / "keys.db")
    assert isinstance(where, PgSchema)
    return SqlKeyStore(where.engine())


@pytest.fixture
def keys(backend: tuple[str, Any]) -> Iterator[Any]:
    store = _key_store(backend)
    yield store
    store.close()


KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def audit(backend: tuple[str, Any]) -> Iterator[AuditStore]:
    kind, where = backend
    store: AuditStore
    if kind == "memory":
        store = MemoryAuditStore(KEY)
    elif kind == "sqlite":
        store = SqlAuditStore(where / "audit.db", signing_key=KEY, page_size=3)
    else:
        store = SqlAuditStore(where.engine(), signing_key=KEY, page_size=3)
    yield store
    store.close()


def rec(key_id: str = "k1", name: str = "one", **kw: Any) -> ApiKeyRecord:
    base: dict[str, Any] = {"key_id": key_id, "name": name, "tenant": "acme", "scopes": frozenset({"a", "b"}),
                            "roles": frozenset({"reader"}), "key_hash": "h" * 64, "created_at": 1000.0}
    base.update(kw)
    return ApiKeyRecord(**base)


# -- KeyStore ------------------------------------------------------------------------------


def test_create_get_list_round_trip(keys: Any) -> None:
    r = rec(rate_limit=RateLimitSpec(10, 60.0, 5), expires_at=2000.5, signing_key_id="sig-1")
    keys.create(r)
    keys.create(rec("k2", "two", created_at=1001.0))
    assert keys.get("k1") == r
    assert keys.get("nope") is None
    assert [x.key_id for x in keys.list()] == ["k1", "k2"]


def test_duplicate_id_or_name_is_refused_and_changes_nothing(keys: Any) -> None:
    keys.create(rec())
    before = keys.revision()
    with pytest.raises(KeyExistsError):
        keys.create(rec("k1", "other"))
    with pytest.raises(KeyExistsError):
        keys.create(rec("k9", "one"))
    assert keys.revision() == before
    assert [x.key_id for x in keys.list()] == ["k1"]


def test_revoke_once_and_revision_moves_on_every_write(keys: Any) -> None:
    r0 = keys.revision()
    keys.create(rec())
    r1 = keys.revision()
    assert r1 > r0
    assert keys.revoke("k1", 1500.0) is True
    r2 = keys.revision()
    assert r2 > r1
    assert keys.revoke("k1", 1600.0) is False  # already revoked: the first time stands
    assert keys.revoke("missing", 1600.0) is False
    assert keys.revision() == r2
    got = keys.get("k1")
    assert got is not None and got.revoked_at == 1500.0


# -- RevocationStore -----------------------------------------------------------------------


def test_token_revocations_in_force_and_lapsing(keys: Any) -> None:
    r0 = keys.revision()
    assert keys.revoke_tokens(RevocationRecord("jti", "t-1", 100.0, 200.0, "stolen")) is True
    assert keys.revoke_tokens(RevocationRecord("sub", "alice", 100.0, None)) is True
    assert keys.revoke_tokens(RevocationRecord("client", "c-1", 100.0, 150.0)) is True
    assert keys.revision() > r0
    assert keys.revoke_tokens(RevocationRecord("jti", "t-1", 120.0, 300.0)) is False  # still in force
    at_130 = {(r.kind, r.value) for r in keys.revocations(130.0)}
    assert at_130 == {("jti", "t-1"), ("sub", "alice"), ("client", "c-1")}
    at_160 = keys.revocations(160.0)
    assert {(r.kind, r.value) for r in at_160} == {("jti", "t-1"), ("sub", "alice")}
    jti = next(r for r in at_160 if r.kind == "jti")
    assert (jti.created_at, jti.expires_at, jti.reason) == (100.0, 200.0, "stolen")
    # A lapsed revocation of the same token may be made again.
    assert keys.revoke_tokens(RevocationRecord("client", "c-1", 160.0, 500.0)) is True
    assert ("client", "c-1") in {(r.kind, r.value) for r in keys.revocations(400.0)}


def test_concurrent_revocations_of_one_token_succeed_once(keys: Any) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def revoke() -> None:
        ok = keys.revoke_tokens(RevocationRecord("jti", "race", 100.0, None))
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=revoke) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False] * 7 + [True]


# -- AuditStore ------------------------------------------------------------------------------


def ev(i: int, **kw: Any) -> AuditEvent:
    base: dict[str, Any] = {"ts": 1714564800.0 + i / 1000, "kind": "request", "request_id": f"r-{i}",
                            "decision": "allow", "reason": "ok", "status": 200, "bytes_in": 2**40 + i,
                            "client_ip": "203.0.113.9", "path": f"/p/{i}", "user_agent": "ü-agent",
                            "latency_ms": 1.25, "extra": {"i": i, "nested": {"x": [1, 2.5, "é"]}}}
    base.update(kw)
    return AuditEvent(**base)


def test_append_batch_chains_and_checkpoints(audit: AuditStore) -> None:
    assert audit.head().seq == 0
    a = audit.append_batch([ev(1), ev(2)])
    b = audit.append_batch([ev(3)])
    assert [e.seq for e in a + b] == [1, 2, 3]
    assert a[1].prev_hash == a[0].hash and b[0].prev_hash == a[1].hash
    head = audit.head()
    assert (head.seq, head.hash, head.checkpoint_seq) == (3, b[0].hash, 3)
    assert [c.seq for c in audit.checkpoints()] == [2, 3]
    assert audit.append_batch([]) == []
    assert audit.head().seq == 3


def test_events_read_back_exactly_and_verify(audit: AuditStore) -> None:
    written = audit.append_batch([ev(i) for i in range(1, 8)])
    read = list(audit.iter_events())
    assert read == written  # every field, the 64-bit integers and the unicode included
    assert [e.seq for e in audit.iter_events(after_seq=2, limit=3)] == [3, 4, 5]
    assert [e.seq for e in audit.tail(2)] == [6, 7]
    report = verify(audit, KEY.public_key())
    assert report.ok, report.problems
    assert report.events_checked == 7 and report.signatures_checked


def test_concurrent_appenders_keep_one_linear_chain(backend: tuple[str, Any]) -> None:
    kind, where = backend
    if kind == "memory":
        pytest.skip("the memory store is one process's list; nothing to race")
    stores = [SqlAuditStore(where / "audit.db" if kind == "sqlite" else where.engine(), signing_key=KEY)
              for _ in range(3)]
    try:
        def run(store: SqlAuditStore, w: int) -> None:
            for n in range(10):
                store.append_batch([ev(w * 100 + n), ev(w * 100 + n + 50)])

        threads = [threading.Thread(target=run, args=(s, w)) for w, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [e.seq for e in stores[0].iter_events()] == list(range(1, 61))
        report = verify(stores[0], KEY.public_key())
        assert report.ok, report.problems
    finally:
        for s in stores:
            s.close()
