"""AuditWriter: group commit on a real SQLite store, never blocking the submitter."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.events import AuditEvent
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.store import AuditStore, ChainHead, Checkpoint
from portcullis.audit.verify import verify
from portcullis.audit.writer import AuditWriter

SRC = Path(__file__).resolve().parents[2] / "src"
# Liveness bound for waits that should end almost at once; a hang fails instead of blocking CI.
WAIT = 30.0


def ev(i: int, **overrides: Any) -> AuditEvent:
    base: dict[str, Any] = {"ts": 1714564800.0 + i / 1000, "kind": "request", "request_id": f"req-{i}",
                            "decision": "allow", "reason": "ok", "status": 200, "extra": {"i": i}}
    base.update(overrides)
    return AuditEvent(**base)


class DelegatingStore:
    """A real store with a hook around append_batch (a wrapper, not a mock)."""

    def __init__(self, inner: SqliteAuditStore) -> None:
        self.inner = inner
        self.calls = 0

    def append_batch(self, events: list[AuditEvent], *, assume_normalized: bool = False) -> list[AuditEvent]:
        self.calls += 1
        self.before_append(events)
        return self.inner.append_batch(events, assume_normalized=assume_normalized)

    def before_append(self, events: list[AuditEvent]) -> None:
        pass

    def iter_events(self, after_seq: int = 0, limit: int | None = None) -> Iterator[AuditEvent]:
        return self.inner.iter_events(after_seq, limit)

    def tail(self, n: int) -> list[AuditEvent]:
        return self.inner.tail(n)

    def head(self) -> ChainHead:
        return self.inner.head()

    def checkpoints(self, after_seq: int = 0, limit: int | None = None) -> Iterator[Checkpoint]:
        return self.inner.checkpoints(after_seq, limit)

    def close(self) -> None:
        self.inner.close()


class GatedStore(DelegatingStore):
    """append_batch waits until the test opens the gate: an arbitrarily slow store."""

    def __init__(self, inner: SqliteAuditStore) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def before_append(self, events: list[AuditEvent]) -> None:
        self.entered.set()
        self.gate.wait()


class FlakyStore(DelegatingStore):
    """The first `failures` appends fail like a locked database."""

    def __init__(self, inner: SqliteAuditStore, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    def before_append(self, events: list[AuditEvent]) -> None:
        if self.calls <= self.failures:
            raise sqlite3.OperationalError("database is locked")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> Iterator[SqliteAuditStore]:
    s = SqliteAuditStore(tmp_path / "audit.db", signing_key=key)
    yield s
    s.close()


def request_ids(store: AuditStore) -> list[str]:
    return [e.request_id for e in store.iter_events()]


def assert_verifies(store: AuditStore, key: Ed25519PrivateKey) -> None:
    report = verify(store, key.public_key())
    assert report.ok, report.problems


async def test_10k_events_from_the_loop_all_written_in_order(store: SqliteAuditStore,
                                                             key: Ed25519PrivateKey) -> None:
    acked: list[str] = []
    writer = AuditWriter(store, on_durable=lambda batch: acked.extend(e.request_id for e in batch))
    writer.start()
    expected = [f"req-{i}" for i in range(10_000)]
    for i in range(10_000):
        assert writer.submit(ev(i))
        if i % 1000 == 0:
            await asyncio.sleep(0)  # let the loop breathe, as a real request path would
    assert writer.submitted_count == 10_000
    assert await asyncio.to_thread(writer.close, WAIT)
    assert not writer.running
    assert writer.durable_count == 10_000
    assert writer.backlog == 0
    assert acked == expected
    assert request_ids(store) == expected
    assert [e.seq for e in store.iter_events()] == list(range(1, 10_001))
    assert_verifies(store, key)


def test_events_are_grouped_into_batches(store: SqliteAuditStore, key: Ed25519PrivateKey) -> None:
    batches: list[int] = []
    writer = AuditWriter(store, max_batch=100, on_durable=lambda b: batches.append(len(b)))
    for i in range(1000):
        assert writer.submit(ev(i))  # queued before the thread starts: all available at once
    writer.start()
    assert writer.close(WAIT)
    assert batches == [100] * 10
    assert len(list(store.checkpoints())) == 10  # one transaction + checkpoint per batch
    assert_verifies(store, key)


async def test_submit_never_waits_for_a_slow_store(store: SqliteAuditStore) -> None:
    slow = GatedStore(store)
    writer = AuditWriter(slow, max_batch=10)
    writer.start()
    fired = threading.Event()

    def watchdog() -> None:  # if submit blocked on the store, this would be what unblocks it
        fired.set()
        slow.gate.set()

    timer = threading.Timer(WAIT, watchdog)
    timer.start()
    try:
        assert writer.submit(ev(0))
        assert await asyncio.to_thread(slow.entered.wait, WAIT)  # the writer is stuck in append_batch
        for i in range(1, 2001):
            assert writer.submit(ev(i))
        assert not fired.is_set()
        assert slow.calls == 1  # still inside the first append
        assert writer.backlog == 2001
        assert writer.durable_count == 0
        assert store.head().seq == 0
    finally:
        timer.cancel()
        slow.gate.set()
    assert await asyncio.to_thread(writer.flush, WAIT)
    assert request_ids(store) == [f"req-{i}" for i in range(2001)]
    assert writer.close(WAIT)


def test_backlog_limit_refuses_instead_of_queueing(store: SqliteAuditStore) -> None:
    slow = GatedStore(store)
    writer = AuditWriter(slow, max_backlog=10)
    writer.start()
    try:
        assert writer.submit(ev(0))
        assert slow.entered.wait(WAIT)
        for i in range(1, 10):
            assert writer.submit(ev(i))
        assert writer.backlog == 10
        assert writer.submit(ev(10)) is False
        assert writer.submit(ev(11)) is False
        assert writer.backlog == 10
    finally:
        slow.gate.set()
    assert writer.flush(WAIT)
    assert writer.backlog == 0
    assert writer.submit(ev(12))
    assert writer.close(WAIT)
    assert request_ids(store) == [f"req-{i}" for i in [*range(10), 12]]


def test_store_errors_are_retried_without_losing_events(store: SqliteAuditStore, key: Ed25519PrivateKey,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakyStore(store, failures=3)
    acked: list[str] = []
    writer = AuditWriter(flaky, max_batch=8, retry_initial=0.001, retry_max=0.01,
                         on_durable=lambda b: acked.extend(e.request_id for e in b))
    with caplog.at_level(logging.WARNING, logger="portcullis.audit"):
        for i in range(50):
            assert writer.submit(ev(i, subject="secret-subject-xyz"))
        writer.start()
        assert writer.close(WAIT)
    expected = [f"req-{i}" for i in range(50)]
    assert flaky.calls >= 4
    assert acked == expected  # each acknowledged once, in order
    assert request_ids(store) == expected
    assert_verifies(store, key)
    failures = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert len(failures) == 3
    assert "database is locked" in failures[0].getMessage()
    assert "secret-subject-xyz" not in caplog.text


def test_real_lock_contention_is_retried(tmp_path: Path, key: Ed25519PrivateKey,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.db"
    store = SqliteAuditStore(path, signing_key=key, busy_timeout=0.01)
    writer = AuditWriter(store, retry_initial=0.01, retry_max=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with caplog.at_level(logging.ERROR, logger="portcullis.audit"):
            writer.start()
            for i in range(20):
                assert writer.submit(ev(i, client_ip="198.51.100.77"))
            deadline = time.monotonic() + WAIT
            while writer.last_error is None and time.monotonic() < deadline:
                time.sleep(0.01)
            error = writer.last_error
            assert error is not None
            assert "locked" in error
            assert writer.durable_count == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert writer.flush(WAIT)
    assert writer.last_error is None  # cleared once a write succeeds
    assert writer.close(WAIT)
    assert request_ids(store) == [f"req-{i}" for i in range(20)]
    assert_verifies(store, key)
    assert "198.51.100.77" not in caplog.text  # SQL parameters are hidden from logs
    store.close()


def test_close_gives_up_on_a_dead_store_loudly(store: SqliteAuditStore,
                                               caplog: pytest.LogCaptureFixture) -> None:
    dead = FlakyStore(store, failures=10**9)
    writer = AuditWriter(dead, retry_initial=0.001, retry_max=0.01)
    writer.start()
    for i in range(5):
        assert writer.submit(ev(i))
    with caplog.at_level(logging.ERROR, logger="portcullis.audit"):
        assert writer.close(timeout=0.2) is False
    assert not writer.running  # close always ends the thread
    assert writer.durable_count == 0
    assert any("5 submitted events NOT written" in r.getMessage() for r in caplog.records)


def test_failing_acknowledgement_does_not_stop_the_writer(store: SqliteAuditStore) -> None:
    def boom(_: list[AuditEvent]) -> None:
        raise RuntimeError("callback bug")

    writer = AuditWriter(store, max_batch=1, on_durable=boom)
    writer.start()
    for i in range(3):
        assert writer.submit(ev(i))
    assert writer.close(WAIT)
    assert writer.durable_count == 3
    assert request_ids(store) == ["req-0", "req-1", "req-2"]  # written once each, not retried


def test_flush_waits_for_everything_submitted(store: SqliteAuditStore) -> None:
    writer = AuditWriter(store, max_batch=7)
    writer.start()
    for i in range(100):
        assert writer.submit(ev(i))
    assert writer.flush(WAIT)
    assert writer.durable_count == 100
    assert store.head().seq == 100
    assert writer.flush(WAIT)  # nothing pending: returns at once
    assert writer.close(WAIT)


def test_flush_times_out_while_the_store_is_stuck(store: SqliteAuditStore) -> None:
    slow = GatedStore(store)
    writer = AuditWriter(slow)
    writer.start()
    try:
        assert writer.submit(ev(0))
        assert writer.flush(timeout=0.05) is False
    finally:
        slow.gate.set()
    assert writer.close(WAIT)


def test_after_close(store: SqliteAuditStore) -> None:
    writer = AuditWriter(store)
    writer.start()
    assert writer.close(WAIT)
    assert writer.submit(ev(0)) is False
    with pytest.raises(RuntimeError):
        writer.start()
    assert writer.close(WAIT)  # idempotent
    assert store.head().seq == 0


def test_close_without_start_still_writes_submitted_events(store: SqliteAuditStore) -> None:
    writer = AuditWriter(store)
    assert writer.submit(ev(0))
    assert writer.close(WAIT)
    assert request_ids(store) == ["req-0"]


def test_unrecordable_event_is_refused_at_submit(store: SqliteAuditStore) -> None:
    writer = AuditWriter(store)
    writer.start()
    with pytest.raises(ValueError, match="ts"):
        writer.submit(ev(0, ts=float("nan")))
    assert writer.backlog == 0
    assert writer.submit(ev(1))
    assert writer.close(WAIT)
    assert request_ids(store) == ["req-1"]


def test_forgotten_close_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    # The thread is non-daemon so pending events get written at exit; it must still end.
    db = tmp_path / "audit.db"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from portcullis.audit.events import AuditEvent
        from portcullis.audit.sqlite import SqliteAuditStore
        from portcullis.audit.writer import AuditWriter
        w = AuditWriter(SqliteAuditStore(Path({str(db)!r}), Ed25519PrivateKey.generate()))
        w.start()
        for i in range(500):
            w.submit(AuditEvent(ts=1.0, kind="request", request_id=f"r{{i}}", decision="allow", reason="ok"))
        # no close()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with SqliteAuditStore(db) as reader:
        assert reader.head().seq == 500
