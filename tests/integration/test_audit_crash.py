"""Acknowledged audit events survive SIGKILL of the writing process.

The harness prints ``ack <request_id>`` only from `AuditWriter`'s on_durable callback.
We SIGKILL it mid-stream (several times, each run continuing the same log) and check
that every acknowledged event is in the database, in order, and that the log verifies.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from portcullis.audit.keys import load_or_create_audit_key
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.verify import verify

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "audit_crash_harness.py"
SRC = HERE.parents[1] / "src"
ACKS_BEFORE_KILL = 2000
ROUNDS = 3
TIMEOUT = 60.0  # for the whole test


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_until_acked(db: Path, key_path: Path, prefix: str, deadline: float, stderr: IO[str]) -> list[str]:
    """Start the harness, collect ACKS_BEFORE_KILL acks, SIGKILL it; returns the acked ids."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, str(HARNESS), str(db), str(key_path), prefix],
        stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env, text=True,
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        while len(acked) < ACKS_BEFORE_KILL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"only {len(acked)} acks before the timeout")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"harness exited early (code {proc.wait()}) after {len(acked)} acks")
            assert line.startswith("ack ") and line.endswith("\n"), repr(line)
            acked.append(line[4:-1])
        # Still running: the kill lands while it is submitting and committing.
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    db = tmp_path / "data" / "audit.db"
    key_path = tmp_path / "secrets" / "audit.pem"
    key = load_or_create_audit_key(key_path)
    all_acked: list[str] = []
    with (tmp_path / "harness.stderr").open("w+") as stderr:
        for round_no in range(ROUNDS):
            prefix = f"r{round_no}"
            acked = _run_until_acked(db, key_path, prefix, deadline, stderr)
            # Acks come in commit order, so they are the first events of this run.
            assert acked == [f"{prefix}-{n:08d}" for n in range(len(acked))]
            all_acked.extend(acked)

            with SqliteAuditStore(db) as store:  # reopened after the crash (WAL recovery)
                ids = [e.request_id for e in store.iter_events()]
                report = verify(store, key.public_key())
            stored = set(ids)
            missing = [rid for rid in all_acked if rid not in stored]
            assert missing == [], f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
            # Nothing lost or reordered between acknowledged ones either: each run's ids
            # are a gap-free prefix of what it submitted.
            this_run = [rid for rid in ids if rid.startswith(prefix + "-")]
            assert this_run == [f"{prefix}-{n:08d}" for n in range(len(this_run))]
            stderr.seek(0)
            assert report.ok, f"{report.problems[:10]}\nharness stderr:\n{stderr.read()[-4000:]}"
            assert report.events_checked == len(ids) >= len(all_acked)
