"""SqliteAuditStore and the signing-key helpers, on real SQLite files."""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portcullis.audit.chain import GENESIS_HASH, chain_hash, checkpoint_message
from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import key_id, load_or_create_audit_key
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.store import AuditStore, AuditStoreError, ChainHead
from portcullis.audit.verify import verify


def ev(i: int, **overrides: Any) -> AuditEvent:
    base: dict[str, Any] = {
        "ts": 1714564800.0 + i / 1000, "kind": "request", "request_id": f"req-{i}",
        "decision": "allow", "reason": "ok", "method": "GET", "path": f"/items/{i}", "status": 200,
        "latency_ms": 1.5, "extra": {"i": i},
    }
    base.update(overrides)
    return AuditEvent(**base)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[SqliteAuditStore]:
    s = SqliteAuditStore(tmp_path / "audit.db", signing_key=key, page_size=3)
    yield s
    s.close()


def assert_linear(store: AuditStore, count: int) -> None:
    events = list(store.iter_events())
    assert [e.seq for e in events] == list(range(1, count + 1))
    prev = GENESIS_HASH
    for e in events:
        assert e.prev_hash == prev
        assert chain_hash(prev, e) == e.hash
        prev = e.hash


def test_is_an_audit_store(store: SqliteAuditStore) -> None:
    s: AuditStore = store  # static check that the class satisfies the Protocol
    assert s is store


def test_empty_store_head(store: SqliteAuditStore) -> None:
    assert store.head() == ChainHead(seq=0, hash=GENESIS_HASH, checkpoint_seq=0)
    assert store.tail(5) == []
    assert list(store.iter_events()) == []
    assert list(store.checkpoints()) == []


def test_append_assigns_chain_fields_and_returns_same_objects(store: SqliteAuditStore) -> None:
    batch = [ev(1), ev(2), ev(3)]
    out = store.append_batch(batch)
    assert out == batch
    assert all(a is b for a, b in zip(out, batch, strict=True))
    assert [e.seq for e in batch] == [1, 2, 3]
    assert batch[0].prev_hash == GENESIS_HASH
    assert batch[1].prev_hash == batch[0].hash
    assert batch[2].hash == chain_hash(batch[1].hash, batch[2])
    store.append_batch([ev(4)])
    assert store.head() == ChainHead(seq=4, hash=chain_hash(batch[2].hash, ev_at(store, 4)), checkpoint_seq=4)


def ev_at(store: AuditStore, seq: int) -> AuditEvent:
    return next(store.iter_events(after_seq=seq - 1, limit=1))


def test_stored_events_read_back_equal(store: SqliteAuditStore) -> None:
    batch = [ev(i, extra={"nested": {"list": [1, 2.5, None, True]}, "s": "é\u2028"}) for i in range(1, 8)]
    store.append_batch(batch)
    assert list(store.iter_events()) == batch


def test_empty_batch_is_a_no_op(store: SqliteAuditStore) -> None:
    assert store.append_batch([]) == []
    assert store.head().seq == 0
    assert list(store.checkpoints()) == []


def test_iteration_pages_after_seq_and_limit(store: SqliteAuditStore) -> None:
    for i in range(1, 11):
        store.append_batch([ev(i)])
    # page_size is 3, so these cross page boundaries.
    assert [e.seq for e in store.iter_events()] == list(range(1, 11))
    assert [e.seq for e in store.iter_events(after_seq=4)] == list(range(5, 11))
    assert [e.seq for e in store.iter_events(after_seq=2, limit=5)] == [3, 4, 5, 6, 7]
    assert [e.seq for e in store.iter_events(limit=3)] == [1, 2, 3]
    assert list(store.iter_events(limit=0)) == []
    assert list(store.iter_events(after_seq=10)) == []


def test_tail(store: SqliteAuditStore) -> None:
    store.append_batch([ev(i) for i in range(1, 6)])
    assert [e.seq for e in store.tail(2)] == [4, 5]
    assert [e.seq for e in store.tail(50)] == [1, 2, 3, 4, 5]
    assert store.tail(0) == []


def test_one_signed_checkpoint_per_batch(store: SqliteAuditStore, key: Ed25519PrivateKey) -> None:
    store.append_batch([ev(1), ev(2)])
    store.append_batch([ev(3)])
    store.append_batch([ev(4), ev(5), ev(6), ev(7)])
    cps = list(store.checkpoints())
    assert [c.seq for c in cps] == [2, 3, 7]
    events = {e.seq: e for e in store.iter_events()}
    for cp in cps:
        assert cp.hash == events[cp.seq].hash
        assert cp.key_id == key_id(key.public_key())
        key.public_key().verify(bytes.fromhex(cp.signature), checkpoint_message(cp.seq, cp.hash, cp.ts))
    assert [c.seq for c in store.checkpoints(after_seq=2)] == [3, 7]
    assert [c.seq for c in store.checkpoints(limit=2)] == [2, 3]
    assert store.head().checkpoint_seq == 7


def test_reopen_keeps_the_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.db"
    with SqliteAuditStore(path, signing_key=key) as s:
        s.append_batch([ev(1), ev(2)])
    with SqliteAuditStore(path, signing_key=key) as s:
        s.append_batch([ev(3)])
        assert_linear(s, 3)
        assert verify(s, key.public_key()).ok


def test_two_stores_on_one_file_keep_one_linear_chain(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # Like the gateway and the CLI: two handles, each must read the head from the
    # database, never from a cache of its own.
    path = tmp_path / "audit.db"
    with SqliteAuditStore(path, signing_key=key) as a, SqliteAuditStore(path, signing_key=key) as b:
        for i in range(1, 21):
            (a if i % 2 else b).append_batch([ev(i), ev(100 + i)])
        assert_linear(a, 40)
        assert a.head() == b.head()
        assert verify(b, key.public_key()).ok


def test_concurrent_appenders_serialize(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.db"
    stores = [SqliteAuditStore(path, signing_key=key) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def append(s: SqliteAuditStore, n: int) -> None:
        try:
            start.wait()
            for i in range(25):
                s.append_batch([ev(n * 1000 + i), ev(n * 1000 + i + 500)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert_linear(stores[0], 4 * 25 * 2)
        report = verify(stores[0], key.public_key())
        assert report.ok, report.problems
        assert report.checkpoints_checked == 100
    finally:
        for s in stores:
            s.close()


def test_verify_while_another_store_appends(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # `audit verify` runs while the gateway keeps writing: new events and checkpoints
    # appearing mid-verification must not be reported as tampering.
    path = tmp_path / "audit.db"
    errors: list[BaseException] = []
    done = threading.Event()

    def append_some() -> None:
        try:
            with SqliteAuditStore(path, signing_key=key) as w:
                for i in range(0, 900, 3):
                    w.append_batch([ev(i), ev(i + 1), ev(i + 2)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    with SqliteAuditStore(path, signing_key=key) as first:
        first.append_batch([ev(-1)])
    writer = threading.Thread(target=append_some)
    writer.start()
    runs = 0
    try:
        with SqliteAuditStore(path, page_size=7) as reader:
            while not done.is_set() or runs == 0:
                report = verify(reader, key.public_key())
                assert report.ok, report.problems
                runs += 1
            report = verify(reader, key.public_key())
            assert report.ok, report.problems
            assert report.events_checked == 901
    finally:
        writer.join()
    assert errors == []


def test_failed_append_stores_nothing_and_can_be_retried(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.db"
    with SqliteAuditStore(path, signing_key=key, busy_timeout=0.05) as s:
        s.append_batch([ev(1)])
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            batch = [ev(2), ev(3)]
            with pytest.raises(Exception, match="locked"):
                s.append_batch(batch)
            assert [(e.seq, e.prev_hash, e.hash) for e in batch] == [(0, "", "")] * 2
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert s.head().seq == 1
        s.append_batch(batch)
        assert [e.seq for e in batch] == [2, 3]
        assert_linear(s, 3)
        assert verify(s, key.public_key()).ok


def test_durability_settings_and_file_mode(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "new" / "dir" / "audit.db"
    with SqliteAuditStore(path, signing_key=key) as s:
        s.append_batch([ev(1)])
        p = s.pragmas()
        assert p["journal_mode"] == "wal"
        assert p["synchronous"] == "2"  # FULL
        assert int(p["busy_timeout"]) > 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name("audit.db-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_read_only_store(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.db"
    with pytest.raises(FileNotFoundError):
        SqliteAuditStore(path)
    assert not path.exists()
    with SqliteAuditStore(path, signing_key=key) as w:
        w.append_batch([ev(1)])
    with SqliteAuditStore(path, verify_key=key.public_key()) as r:
        assert [e.seq for e in r.iter_events()] == [1]
        assert verify(r, r.verify_key).ok
        with pytest.raises(AuditStoreError):
            r.append_batch([ev(2)])


def test_read_only_refuses_a_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()
    with pytest.raises(AuditStoreError, match="not a Portcullis audit database"):
        SqliteAuditStore(path)


def test_mismatched_keys_are_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with SqliteAuditStore(tmp_path / "audit.db", signing_key=key, verify_key=key.public_key()) as s:
        assert s.verify_key == key.public_key()
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError, match="verify_key"):
        SqliteAuditStore(tmp_path / "audit.db", signing_key=key, verify_key=other)


def test_awkward_strings_round_trip(store: SqliteAuditStore, key: Ed25519PrivateKey) -> None:
    e = ev(1, user_agent="nul\x00byte", path="/caf\u00e9/\U0001f600", host="bad\udcffhost",
           extra={"ctl": "\x1b[31m\n", "k\x00": "v"})
    store.append_batch([e])
    (back,) = store.iter_events()
    assert back == e
    assert back.user_agent == "nul\x00byte"
    assert back.host == "bad\\udcffhost"
    assert verify(store, key.public_key()).ok


def test_negative_zero_latency_verifies(store: SqliteAuditStore, key: Ed25519PrivateKey) -> None:
    store.append_batch([ev(1, latency_ms=-0.0), ev(2, latency_ms=-0.0001)])
    assert verify(store, key.public_key()).ok


text = st.text(st.characters(exclude_categories=()), max_size=40)
json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                          max_leaves=10)
events = st.builds(
    AuditEvent,
    ts=st.floats(min_value=0, max_value=4e9), kind=text, request_id=text, decision=text, reason=text,
    method=text, host=text, path=text, route=text, status=st.integers(-(2**63), 2**63 - 1),
    bytes_in=st.integers(0, 2**63 - 1), bytes_out=st.integers(0, 2**40),
    latency_ms=st.floats(min_value=-1e9, max_value=1e9), client_ip=text, user_agent=text, subject=text,
    tenant=text, credential_id=text, credential_kind=text, client_id=text,
    extra=st.dictionaries(text, json_value, max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=4))
def test_any_event_is_stored_exactly_as_hashed(batches: list[list[AuditEvent]]) -> None:
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as d, SqliteAuditStore(Path(d) / "a.db", signing_key=key) as s:
        written: list[AuditEvent] = []
        for batch in batches:
            written.extend(dataclasses.replace(e) for e in s.append_batch(batch))
        assert list(s.iter_events()) == written
        report = verify(s, key.public_key())
        assert report.ok, report.problems
        assert report.events_checked == len(written)


# --- signing keys -----------------------------------------------------------------------


def test_load_or_create_audit_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "nested" / "audit.pem"
    k1 = load_or_create_audit_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    k2 = load_or_create_audit_key(path)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert k1.public_key().public_bytes(*raw) == k2.public_key().public_bytes(*raw)
    assert [p.name for p in path.parent.iterdir()] == ["audit.pem"]  # no temp files left


def test_concurrent_key_creation_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.pem"
    keys: list[str] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        keys.append(key_id(load_or_create_audit_key(path).public_key()))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1


def test_key_id_is_16_hex_of_raw_public_key_hash(key: Ed25519PrivateKey) -> None:
    import hashlib

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_non_ed25519_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.pem"
    path.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ValueError, match="Ed25519"):
        load_or_create_audit_key(path)
