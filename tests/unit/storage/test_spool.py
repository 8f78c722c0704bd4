"""The audit spool: durable batches on disk, drained in order, never twice, never lost."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.chain import normalize_event
from portcullis.audit.events import AuditEvent
from portcullis.audit.spool import SPOOL_KEY, AuditSpool, SpoolFullError
from portcullis.audit.sqlite import SqlAuditStore
from portcullis.audit.writer import AuditWriter

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def ev(i: int) -> AuditEvent:
    return normalize_event(AuditEvent(ts=1.0 + i, kind="request", request_id=f"r{i}", decision="allow",
                                      reason="ok", extra={"i": i, "f": 0.1}))


def test_round_trip_is_exact_and_private(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "s")
    batch = [ev(1), ev(2)]
    bid = spool.put(batch, uncertain=False)
    assert all(e.extra[SPOOL_KEY] == bid for e in batch)
    assert spool.pending == 1 and spool.size > 0
    (name,) = spool.batches()
    assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    got = AuditSpool(tmp_path / "s").read(name)  # as a restarted process sees it
    assert got is not None and got.uncertain  # the oldest file after a restart may be committed
    assert got.events == batch
    spool.remove(name)
    assert spool.pending == 0 and spool.size == 0


def test_full_spool_refuses_and_corrupt_file_is_set_aside(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "s", max_bytes=10)
    full = [ev(1)]
    with pytest.raises(SpoolFullError):
        spool.put(full, uncertain=False)
    assert SPOOL_KEY not in full[0].extra and spool.pending == 0
    spool = AuditSpool(tmp_path / "t")
    spool.put([ev(1)], uncertain=False)
    (name,) = spool.batches()
    (tmp_path / "t" / name).write_text('{"v":1,"count":5}\n', encoding="utf-8")
    assert spool.read(name) is None
    assert spool.batches() == [] and list((tmp_path / "t").glob("*.corrupt"))


def test_slots_are_exclusive_and_taken_back(tmp_path: Path) -> None:
    a = AuditSpool.claim(tmp_path)
    b = AuditSpool.claim(tmp_path)
    assert (a.directory.name, b.directory.name) == ("0", "1")
    a.close()
    c = AuditSpool.claim(tmp_path)
    assert c.directory.name == "0"
    b.close()
    c.close()


def test_uncertain_batch_already_committed_is_not_appended_twice(tmp_path: Path) -> None:
    """The append failed after COMMIT: the spooled copy must not be stored again."""
    store = SqlAuditStore(tmp_path / "a.db", signing_key=KEY)
    batch = [ev(1), ev(2)]
    store.append_batch([ev(1), ev(2)], assume_normalized=True)  # committed, but the writer saw an error
    spool = AuditSpool(tmp_path / "s")
    spool.put(batch, uncertain=True)
    spool.put([ev(3)], uncertain=False)
    writer = AuditWriter(store, spool=spool)
    writer.start()
    assert writer.flush(30)
    assert writer.close(30)
    assert [e.request_id for e in store.iter_events()] == ["r1", "r2", "r3"]
    assert spool.pending == 0
    store.close()
