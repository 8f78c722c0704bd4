"""verify() against a log tampered with directly in the SQLite file.

Each test edits the database with the stdlib sqlite3 module (as an attacker with file
access would), then asserts that verification fails with a problem naming the seq.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.chain import chain_hash, checkpoint_message
from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import key_id
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.verify import VerifyReport, format_event, verify

# Batches chosen so some events carry a checkpoint and some do not:
# checkpoints at seq 1, 4, 5, 7, 8, 9, 10.
BATCHES = [[1], [2, 3, 4], [5], [6, 7], [8], [9], [10]]
CHECKPOINTED = [1, 4, 5, 7, 8, 9, 10]


def make_event(i: int) -> AuditEvent:
    return AuditEvent(
        ts=1714564800.0 + i, kind="request", request_id=f"req-{i}", decision="allow", reason="ok",
        method="GET", host="api.example.com", path=f"/items/{i}", route="items", status=200,
        bytes_in=i, bytes_out=10 * i, latency_ms=1.25, client_ip="203.0.113.9", user_agent="ua",
        subject="alice", tenant="acme", credential_id="k1", credential_kind="api_key", client_id="c1",
        extra={"i": i, "tags": ["a", "b"]},
    )


@dataclasses.dataclass
class Log:
    path: Path
    key: Ed25519PrivateKey

    def verify(self, **kw: Any) -> VerifyReport:
        """Verify with the log's own key, through a read-only store (like `audit verify`)."""
        return self.verify_with(self.key, **kw)

    def verify_with(self, key: Ed25519PrivateKey | None, **kw: Any) -> VerifyReport:
        vk = key.public_key() if key is not None else None
        # Small pages so streaming across page boundaries is exercised too.
        with SqliteAuditStore(self.path, page_size=4) as store:
            return verify(store, vk, **kw)

    def events(self) -> list[AuditEvent]:
        with SqliteAuditStore(self.path) as store:
            return list(store.iter_events())

    def sql(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)


@pytest.fixture
def log(tmp_path: Path) -> Log:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.db"
    with SqliteAuditStore(path, signing_key=key) as store:
        for batch in BATCHES:
            store.append_batch([make_event(i) for i in batch])
    return Log(path, key)


def problems_at(report: VerifyReport, seq: int) -> list[str]:
    return [p for p in report.problems if p.startswith(f"seq {seq}:")]


def assert_tampered_at(report: VerifyReport, seq: int, *words: str) -> None:
    assert not report.ok
    found = problems_at(report, seq)
    assert found, f"no problem names seq {seq}: {report.problems}"
    for word in words:
        assert any(word in p for p in found), f"{word!r} not in {found}"


EVENT_COLUMNS = ("ts", "kind", "request_id", "decision", "reason", "method", "host", "path", "route",
                 "status", "bytes_in", "bytes_out", "latency_ms", "client_ip", "user_agent", "subject",
                 "tenant", "credential_id", "credential_kind", "client_id", "extra", "seq", "prev_hash",
                 "hash")


def write_event(conn: sqlite3.Connection, e: AuditEvent, *, insert: bool = False) -> None:
    row = {c: getattr(e, c) for c in EVENT_COLUMNS}
    row["extra"] = json.dumps(e.extra, sort_keys=True, separators=(",", ":"))
    if insert:
        cols = ",".join(row)
        conn.execute(f"INSERT INTO events ({cols}) VALUES ({','.join(':' + c for c in row)})", row)
    else:
        sets = ",".join(f"{c} = :{c}" for c in row if c != "seq")
        conn.execute(f"UPDATE events SET {sets} WHERE seq = :seq", row)


# --- the clean log ------------------------------------------------------------------------


def test_clean_log_verifies(log: Log) -> None:
    report = log.verify()
    assert report.ok, report.problems
    assert report.problems == []
    assert report.events_checked == 10
    assert report.checkpoints_checked == len(CHECKPOINTED)
    assert report.last_seq == 10
    assert report.signatures_checked


def test_clean_empty_log_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with SqliteAuditStore(tmp_path / "a.db", signing_key=key) as store:
        report = verify(store, key.public_key())
    assert report.ok
    assert report.events_checked == 0


# --- modified events ------------------------------------------------------------------------


@pytest.mark.parametrize("column", [c for c in EVENT_COLUMNS if c not in ("seq", "extra")])
@pytest.mark.parametrize("seq", [3, 4])  # without and with a checkpoint
def test_modified_field(log: Log, column: str, seq: int) -> None:
    with log.sql() as conn:
        (value,) = conn.execute(f"SELECT {column} FROM events WHERE seq = ?", (seq,)).fetchone()
        if isinstance(value, str):
            new: object = "0" * 64 if column in ("prev_hash", "hash") else value + "x"
        elif isinstance(value, int):
            new = value + 1
        else:
            new = value + 0.5
        conn.execute(f"UPDATE events SET {column} = ? WHERE seq = ?", (new, seq))
    report = log.verify()
    if column == "hash":
        # The stored hash no longer matches the content, and the next event's link breaks.
        assert_tampered_at(report, seq, "modified")
        assert_tampered_at(report, seq + 1, "does not link")
    elif column == "prev_hash":
        assert_tampered_at(report, seq, "does not link")
    else:
        assert_tampered_at(report, seq, "modified")


@pytest.mark.parametrize("new_extra", ['{"i":99,"tags":["a","b"]}', '{"i":3,"tags":["a","b"],"x":1}',
                                       '{"i":3,"tags":["b","a"]}', '{"i":3}', "{}"])
def test_modified_extra(log: Log, new_extra: str) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET extra = ? WHERE seq = 3", (new_extra,))
    assert_tampered_at(log.verify(), 3, "modified")


def test_modified_event_with_recomputed_hash_breaks_next_link(log: Log) -> None:
    # An attacker who knows the algorithm re-hashes the edited event.
    e = log.events()[2]
    e.decision, e.status = "deny", 403
    e.hash = chain_hash(e.prev_hash, e)
    with log.sql() as conn:
        write_event(conn, e)
    report = log.verify()
    assert problems_at(report, 3) == []
    assert_tampered_at(report, 4, "does not link to seq 3")


def test_history_rewritten_consistently_is_caught_by_checkpoints(log: Log) -> None:
    # Edit seq 3 and re-chain everything after it: every link is valid again, only the
    # signed checkpoints (which the attacker cannot re-sign) disagree.
    events = log.events()
    events[2].status = 500
    prev = events[1].hash
    for e in events[2:]:
        e.prev_hash = prev
        e.hash = prev = chain_hash(prev, e)
    with log.sql() as conn:
        for e in events[2:]:
            write_event(conn, e)
    report = log.verify()
    for seq in (4, 5, 7, 8, 9, 10):
        assert_tampered_at(report, seq, "checkpoint hash does not match")
    assert_tampered_at(report, 2, "not covered by a valid signed checkpoint")


def test_undecodable_column_is_reported_and_verification_continues(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET status = 'abc' WHERE seq = 3")
    report = log.verify()
    assert_tampered_at(report, 3, "unreadable")
    assert report.events_checked == 9
    assert all(p.startswith("seq 3:") for p in report.problems), report.problems


def test_invalid_json_extra_is_reported(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET extra = '{not json' WHERE seq = 6")
    assert_tampered_at(log.verify(), 6, "unreadable")


def test_invalid_utf8_text_is_reported(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET path = CAST(X'2FFF' AS TEXT) WHERE seq = 6")
    assert_tampered_at(log.verify(), 6, "modified")


def test_blob_in_text_column_is_reported(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET subject = X'616C696365' WHERE seq = 6")  # b"alice"
    assert_tampered_at(log.verify(), 6, "unreadable")


# --- deleted events ------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [3, 5])  # without and with a checkpoint
def test_deleted_middle_event(log: Log, seq: int) -> None:
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq = ?", (seq,))
    report = log.verify()
    assert_tampered_at(report, seq, "missing")
    assert_tampered_at(report, seq + 1, f"does not link to seq {seq - 1}")
    if seq in CHECKPOINTED:
        assert any("checkpoint refers to a missing event" in p for p in problems_at(report, seq))


def test_deleted_range(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq BETWEEN 3 AND 6")
    assert_tampered_at(log.verify(), 3, "events 3-6 missing")


def test_deleted_first_event(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq = 1")
    report = log.verify()
    assert_tampered_at(report, 1, "missing")
    assert_tampered_at(report, 2, "genesis")


def test_deleted_tail_is_reported_via_checkpoints(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq >= 9")
    report = log.verify()
    assert report.last_seq == 8
    assert_tampered_at(report, 9, "beyond the last event (seq 8)", "truncated")
    assert_tampered_at(report, 10, "truncated")


def test_deleted_tail_between_checkpoints_is_reported(log: Log) -> None:
    # Delete 6..10 and the checkpoints after 7: the surviving checkpoint at 7 gives it away.
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq >= 6")
        conn.execute("DELETE FROM checkpoints WHERE seq > 7")
    report = log.verify()
    assert_tampered_at(report, 7, "truncated")


def test_truncated_then_extended_log(log: Log) -> None:
    # Truncate to 8, then the (unaware) writer appends again: the old checkpoints at
    # 9 and 10 now disagree with the new events there.
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq >= 9")
    with SqliteAuditStore(log.path, signing_key=log.key) as store:
        store.append_batch([make_event(100), make_event(101)])
    report = log.verify()
    assert_tampered_at(report, 9, "checkpoint hash does not match")
    assert_tampered_at(report, 10, "checkpoint hash does not match")


def test_tail_deleted_with_its_checkpoints_is_not_detectable_locally(log: Log) -> None:
    """Documented limit: removing the newest events *and* their checkpoints leaves a
    shorter but internally consistent log. Only an external copy of a recent checkpoint
    (e.g. shipped off-host) can reveal it."""
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq >= 9")
        conn.execute("DELETE FROM checkpoints WHERE seq >= 9")
    report = log.verify()
    assert report.ok
    assert report.last_seq == 8


# --- reordered and inserted events ------------------------------------------------------


def test_swapped_events(log: Log) -> None:
    events = log.events()
    a, b = events[1], events[2]  # seq 2 and 3
    with log.sql() as conn:
        write_event(conn, dataclasses.replace(b, seq=a.seq))
        write_event(conn, dataclasses.replace(a, seq=b.seq))
    report = log.verify()
    assert_tampered_at(report, 2, "modified")
    assert_tampered_at(report, 3, "modified")


def test_swapped_events_with_rechained_hashes(log: Log) -> None:
    # Swap 2 and 3 and recompute the chain through the end: only checkpoints catch it.
    events = log.events()
    events[1], events[2] = events[2], events[1]
    prev = events[0].hash
    for seq, e in enumerate(events[1:], start=2):
        e.seq, e.prev_hash = seq, prev
        e.hash = prev = chain_hash(prev, e)
    with log.sql() as conn:
        for e in events[1:]:
            write_event(conn, e)
    report = log.verify()
    assert_tampered_at(report, 4, "checkpoint hash does not match")


def test_forged_event_appended_after_last_checkpoint(log: Log) -> None:
    last = log.events()[-1]
    forged = dataclasses.replace(make_event(11), seq=11, prev_hash=last.hash)
    forged.hash = chain_hash(forged.prev_hash, forged)  # a perfectly chained forgery
    with log.sql() as conn:
        write_event(conn, forged, insert=True)
    report = log.verify()
    assert_tampered_at(report, 11, "not covered by a valid signed checkpoint")
    assert [p for p in report.problems if not p.startswith("seq 11:")] == []


def test_forged_event_inserted_in_the_middle(log: Log) -> None:
    # Make room at seq 6 by renumbering 6..10 to 7..11, then insert a chained forgery.
    events = log.events()
    with log.sql() as conn:
        conn.execute("UPDATE events SET seq = seq + 1000 WHERE seq >= 6")
        conn.execute("UPDATE events SET seq = seq - 999 WHERE seq >= 1006")
        forged = dataclasses.replace(make_event(6), decision="deny", seq=6, prev_hash=events[4].hash)
        forged.hash = chain_hash(forged.prev_hash, forged)
        write_event(conn, forged, insert=True)
    report = log.verify()
    # The forgery itself links fine to seq 5 (only the missing checkpoint coverage from
    # it onwards is reported there)...
    assert [p for p in problems_at(report, 6) if "not covered" not in p] == []
    # ...but what follows it does not.
    assert_tampered_at(report, 7, "modified", "does not link to seq 6", "checkpoint hash does not match")


def test_forged_event_inserted_and_rechained(log: Log) -> None:
    events = log.events()
    forged = dataclasses.replace(make_event(6), decision="deny")
    rewritten = [*events[:5], forged, *events[5:]]
    prev = events[4].hash
    for seq, e in enumerate(rewritten[5:], start=6):
        e.seq, e.prev_hash = seq, prev
        e.hash = prev = chain_hash(prev, e)
    with log.sql() as conn:
        conn.execute("DELETE FROM events WHERE seq >= 6")
        for e in rewritten[5:]:
            write_event(conn, e, insert=True)
    report = log.verify()
    assert_tampered_at(report, 7, "checkpoint hash does not match")
    assert_tampered_at(report, 6, "not covered")


# --- checkpoints -----------------------------------------------------------------------------


def test_forged_checkpoint_signature(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 4", ("ab" * 64,))
    report = log.verify()
    assert_tampered_at(report, 4, "signature is invalid")
    assert [p for p in report.problems if not p.startswith("seq 4:")] == []


def test_checkpoint_resigned_with_attacker_key_under_our_key_id(log: Log) -> None:
    attacker = Ed25519PrivateKey.generate()
    with log.sql() as conn:
        (h, ts) = conn.execute("SELECT hash, ts FROM checkpoints WHERE seq = 7").fetchone()
        sig = attacker.sign(checkpoint_message(7, h, ts)).hex()
        conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 7", (sig,))
    assert_tampered_at(log.verify(), 7, "signature is invalid")


def test_checkpoint_signed_by_unknown_key(log: Log) -> None:
    attacker = Ed25519PrivateKey.generate()
    with log.sql() as conn:
        (h, ts) = conn.execute("SELECT hash, ts FROM checkpoints WHERE seq = 7").fetchone()
        sig = attacker.sign(checkpoint_message(7, h, ts)).hex()
        conn.execute("UPDATE checkpoints SET signature = ?, key_id = ? WHERE seq = 7",
                     (sig, key_id(attacker.public_key())))
    assert_tampered_at(log.verify(), 7, "unknown key id")


@pytest.mark.parametrize(("column", "value"), [("hash", "0" * 64), ("ts", 1.0), ("seq", 3)])
def test_altered_checkpoint_fields(log: Log, column: str, value: object) -> None:
    with log.sql() as conn:
        conn.execute(f"UPDATE checkpoints SET {column} = ? WHERE seq = 4", (value,))
    report = log.verify()
    shown_at = 3 if column == "seq" else 4
    assert_tampered_at(report, shown_at, "signature is invalid")
    if column == "hash":
        assert_tampered_at(report, 4, "checkpoint hash does not match")


def test_whole_log_resigned_by_attacker_is_rejected(log: Log) -> None:
    # Rewrite history and re-sign every checkpoint with the attacker's own key.
    attacker = Ed25519PrivateKey.generate()
    events = log.events()
    events[0].subject = "mallory"
    prev = events[0].prev_hash
    for e in events:
        e.prev_hash = prev
        e.hash = prev = chain_hash(prev, e)
    by_seq = {e.seq: e for e in events}
    with log.sql() as conn:
        for e in events:
            write_event(conn, e)
        for seq, ts in conn.execute("SELECT seq, ts FROM checkpoints").fetchall():
            sig = attacker.sign(checkpoint_message(seq, by_seq[seq].hash, ts)).hex()
            conn.execute("UPDATE checkpoints SET hash = ?, signature = ?, key_id = ? WHERE seq = ?",
                         (by_seq[seq].hash, sig, key_id(attacker.public_key()), seq))
    report = log.verify()
    for seq in CHECKPOINTED:
        assert_tampered_at(report, seq, "unknown key id")
    assert_tampered_at(report, 1, "not covered")
    # With the attacker's key it is self-consistent, which is why the key must be kept safe.
    assert log.verify_with(attacker).ok


def test_wrong_verify_key_rejects_every_checkpoint(log: Log) -> None:
    report = log.verify_with(Ed25519PrivateKey.generate())
    assert not report.ok
    for seq in CHECKPOINTED:
        assert_tampered_at(report, seq, "unknown key id")


def test_without_a_key_signatures_are_not_checked_but_hashes_are(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 4", ("ab" * 64,))
    report = log.verify_with(None)
    assert report.ok
    assert not report.signatures_checked
    with log.sql() as conn:
        conn.execute("UPDATE events SET status = 201 WHERE seq = 2")
    assert_tampered_at(log.verify_with(None), 2, "modified")


def test_problem_list_is_capped(log: Log) -> None:
    with log.sql() as conn:
        conn.execute("UPDATE events SET status = 201")
    report = log.verify(max_problems=3)
    assert not report.ok
    assert len(report.problems) == 4
    assert report.problems[-1].startswith("... and ")


# --- rendering for `audit tail` --------------------------------------------------------------


def test_format_event_is_one_line(log: Log) -> None:
    e = log.events()[2]
    line = format_event(e)
    assert line.startswith("2024-05-01T12:00:03.000000Z #3 request allow ok GET api.example.com/items/3 200")
    assert "sub=alice" in line
    assert "rid=req-3" in line
    assert "\n" not in line


def test_format_event_escapes_control_characters() -> None:
    e = make_event(1)
    e.user_agent = "x"
    e.path = "/a\nFAKE LINE\x1b[2J"
    e.subject = "bob\r\u2028"
    line = format_event(e)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "\u2028" not in line
    assert "/a\\nFAKE LINE\\x1b[2J" in line
