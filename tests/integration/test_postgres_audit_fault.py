"""Fault test: the audit database goes away mid-run and comes back.

A THROWAWAY PostgreSQL (initdb into a temp dir, its own free loopback port, stopped and
started by this test alone — never the shared server) holds the audit log. While it is
down the writer keeps acknowledging events by spooling them to local disk; a writer
restarted while it is still down finds the spool and keeps going; when the database
returns, the spool drains. Every acknowledged event ends up in the chain exactly once, in
submission order, and the chain verifies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.events import AuditEvent
from portcullis.audit.spool import AuditSpool
from portcullis.audit.sqlite import SqlAuditStore
from portcullis.audit.verify import verify
from portcullis.audit.writer import AuditWriter
from portcullis.storage.engine import StorageConfig, make_engine

PG_BIN = [Path(shutil.which(n) or f"/usr/local/bin/{n}") for n in ("initdb", "pg_ctl")]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
WAIT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temp dir (as user postgres when we are root:
    initdb refuses to run as root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="portcullis-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(str(PG_BIN[0]), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale=C")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run(str(PG_BIN[1]), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "30",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: like a crash (recovery on the next start)."""
        self._run(str(PG_BIN[1]), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    if not all(p.exists() for p in PG_BIN):
        pytest.skip("initdb/pg_ctl not installed: cannot start a throwaway PostgreSQL")
    pg = ThrowawayPostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def event(n: int) -> AuditEvent:
    return AuditEvent(ts=time.time(), kind="request", request_id=f"req-{n:06d}", decision="allow", reason="ok",
                      method="POST", path=f"/orders/{n}", status=201, client_ip="203.0.113.7", extra={"n": n})


def wait_until(cond: object, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_database_down_and_writer_restart_lose_no_acknowledged_event(postgres: ThrowawayPostgres,
                                                                     tmp_path: Path) -> None:
    engine = make_engine(postgres.url, StorageConfig(connect_timeout_seconds=2, statement_timeout_seconds=5))
    store = SqlAuditStore(engine, signing_key=KEY)  # migrates the empty database
    spool_root = tmp_path / "audit-spool"
    acked: list[str] = []
    lock = threading.Lock()

    def ack(batch: list[AuditEvent]) -> None:
        with lock:
            acked.extend(e.request_id for e in batch)

    def new_writer() -> AuditWriter:
        w = AuditWriter(store, max_batch=50, retry_initial=0.02, retry_max=0.2, on_durable=ack,
                        spool=AuditSpool.claim(spool_root))
        w.start()
        return w

    n = 0

    def submit(w: AuditWriter, count: int) -> None:
        nonlocal n
        for _ in range(count):
            assert w.submit(event(n))
            n += 1

    writer = new_writer()
    try:
        submit(writer, 300)
        assert writer.flush(WAIT)
        assert store.head().seq == 300  # straight into the database while it is up

        postgres.stop()  # a crash of the database, mid-run
        submit(writer, 400)
        assert writer.flush(WAIT), "events were not acknowledged while the database was down"
        assert writer.spooled_batches > 0
        assert writer.close(WAIT)  # the process stops while the database is still down

        spooled = list((spool_root / "0").glob("*.batch"))
        assert spooled, "nothing on disk after the writer stopped"
        writer = new_writer()  # a new process: takes the slot back, keeps spooling
        submit(writer, 200)
        assert writer.flush(WAIT)
        assert writer.spooled_batches > len(spooled) - 1

        postgres.start()  # the database returns: the spool drains by itself
        wait_until(lambda: writer.spooled_batches == 0)
        submit(writer, 100)
        assert writer.flush(WAIT)
        assert writer.close(WAIT)
    finally:
        writer.close(5)

    assert len(acked) == n == 1000
    stored = [e.request_id for e in store.iter_events()]
    assert stored == [f"req-{i:06d}" for i in range(n)]  # all of them, once, in submission order
    report = verify(store, KEY.public_key())
    assert report.ok, report.problems
    assert not list((spool_root / "0").glob("*.batch"))
    store.close()
