"""Verification of the audit log (hash chain + signed checkpoints) and one-line rendering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portcullis.audit.chain import GENESIS_HASH, chain_hash, checkpoint_message
from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import key_id
from portcullis.audit.store import AuditStore, Checkpoint, CorruptEventError


@dataclass(slots=True)
class VerifyReport:
    """Outcome of `verify`. `ok` is True only if `problems` is empty.

    Each problem starts with ``"seq N: "`` naming the first seq it concerns.
    `signatures_checked` is False when no verify key was given (checkpoint hashes were
    still compared, signatures were not).
    """

    ok: bool
    events_checked: int
    problems: list[str] = field(default_factory=list)
    checkpoints_checked: int = 0
    last_seq: int = 0
    signatures_checked: bool = False


class _Problems:
    """Collects problem messages, keeping at most `limit` (a wrecked log has millions)."""

    def __init__(self, limit: int) -> None:
        self.items: list[str] = []
        self.total = 0
        self._limit = limit

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.items) < self._limit:
            self.items.append(message)

    def result(self) -> list[str]:
        if self.total > len(self.items):
            return [*self.items, f"... and {self.total - len(self.items)} more problems"]
        return list(self.items)


class _Checkpoints:
    """Seq-ordered checkpoint stream with one item of lookahead, ending after `last_seq`."""

    def __init__(self, it: Iterator[Checkpoint], last_seq: int) -> None:
        self._it = it
        self._last = last_seq
        self._next: Checkpoint | None = None
        self._done = False

    def pop_through(self, seq: int) -> Iterator[Checkpoint]:
        """Yield (and consume) the remaining checkpoints with ``cp.seq <= seq``."""
        while True:
            if self._next is None and not self._done:
                cp = next(self._it, None)
                if cp is None or cp.seq > self._last:
                    self._done = True
                else:
                    self._next = cp
            if self._next is None or self._next.seq > seq:
                return
            cp, self._next = self._next, None
            yield cp


def _events(store: AuditStore, last_seq: int) -> Iterator[AuditEvent | CorruptEventError]:
    """Events up to `last_seq`; an undecodable row is yielded as its error and skipped."""
    after = 0
    while True:
        try:
            for ev in store.iter_events(after_seq=after):
                if ev.seq > last_seq:
                    return
                after = ev.seq
                yield ev
            return
        except CorruptEventError as err:
            if err.seq > last_seq:
                return
            after = err.seq
            yield err


def verify(
    store: AuditStore, verify_key: Ed25519PublicKey | None, *, max_problems: int = 1000,
) -> VerifyReport:
    """Check the whole log: every event's hash, every link, every checkpoint.

    Detects modified events (any field, `extra` included), deleted events (seq gaps,
    broken links), reordered or inserted events, checkpoints with a bad signature or
    from another key, checkpoints whose hash differs from the event at their seq,
    checkpoints beyond the last event (tail truncation), and events after the last
    valid checkpoint (forged appends). Undetectable by design: deleting the tail
    together with all its checkpoints, or a rewrite by someone holding the signing key.

    Streams events and checkpoints (constant memory except for at most `max_problems`
    messages). Safe while writers append: only what existed when it started is judged.
    """
    head = store.head()
    # Everything at or below these existed when we started; later appends are ignored.
    last_event_seq = head.seq
    last_cp_seq = max(head.seq, head.checkpoint_seq)
    expected_kid = key_id(verify_key) if verify_key is not None else None
    problems = _Problems(max_problems)
    cps = _Checkpoints(store.checkpoints(), last_cp_seq)
    cps_checked = 0

    def signature_ok(cp: Checkpoint) -> bool:
        nonlocal cps_checked
        cps_checked += 1
        if verify_key is None:
            return True
        if cp.key_id != expected_kid:
            problems.add(f"seq {cp.seq}: checkpoint signed by unknown key id {cp.key_id!r} "
                         f"(expected {expected_kid})")
            return False
        try:
            verify_key.verify(bytes.fromhex(cp.signature), checkpoint_message(cp.seq, cp.hash, cp.ts))
        except (ValueError, InvalidSignature):
            problems.add(f"seq {cp.seq}: checkpoint signature is invalid (forged or altered checkpoint)")
            return False
        return True

    prev_seq = 0
    prev_hash: str | None = GENESIS_HASH  # None after an unreadable row: link unknown
    anchored = 0  # highest seq vouched for by a valid checkpoint
    checked = 0
    for item in _events(store, last_event_seq):
        seq = item.seq
        if seq > prev_seq + 1:
            missing = f"seq {prev_seq + 1}: missing event" if seq == prev_seq + 2 else (
                f"seq {prev_seq + 1}: events {prev_seq + 1}-{seq - 1} missing")
            problems.add(f"{missing} (deleted; next present is seq {seq})")
        for cp in cps.pop_through(seq - 1):
            signature_ok(cp)
            problems.add(f"seq {cp.seq}: checkpoint refers to a missing event")

        cur_hash: str | None
        if isinstance(item, CorruptEventError):
            problems.add(f"seq {seq}: unreadable event row ({item.detail})")
            cur_hash = None
        else:
            checked += 1
            try:
                computed: str | None = chain_hash(item.prev_hash, item)
            except (TypeError, ValueError):
                computed = None
            if computed != item.hash:
                problems.add(f"seq {seq}: content does not match its hash (event modified)")
            if prev_hash is not None and item.prev_hash != prev_hash:
                if prev_seq == 0:
                    problems.add(f"seq {seq}: prev_hash is not the genesis hash (events before it removed?)")
                else:
                    problems.add(f"seq {seq}: prev_hash does not link to seq {prev_seq} "
                                 "(event deleted, inserted or reordered)")
            cur_hash = item.hash

        for cp in cps.pop_through(seq):
            valid = signature_ok(cp)
            if cur_hash is None:
                continue  # the row is already reported as unreadable
            if cp.hash != cur_hash:
                problems.add(f"seq {seq}: checkpoint hash does not match the event (history rewritten)")
            elif valid:
                anchored = seq
        prev_seq, prev_hash = seq, cur_hash

    for cp in cps.pop_through(last_cp_seq):
        signature_ok(cp)
        problems.add(f"seq {cp.seq}: checkpoint refers beyond the last event (seq {prev_seq}): "
                     "log truncated")
    if prev_seq > anchored:
        problems.add(f"seq {anchored + 1}: events {anchored + 1}-{prev_seq} are not covered by a valid "
                     "signed checkpoint (forged append, or tail rewritten)")

    return VerifyReport(
        ok=problems.total == 0,
        events_checked=checked,
        problems=problems.result(),
        checkpoints_checked=cps_checked,
        last_seq=prev_seq,
        signatures_checked=verify_key is not None,
    )


def _printable(text: str) -> str:
    # Stored fields are client-controlled: escape control characters (newlines, ANSI
    # escapes) so one event is always one harmless terminal line.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError, TypeError):
        return repr(ts)


def format_event(event: AuditEvent) -> str:
    """One line for `audit tail`, e.g.
    ``2024-05-01T12:00:00.000000Z #42 request allow ok GET api.example.com/v1/x 200 3.2ms
    203.0.113.9 sub=alice tenant=acme cred=k1 rid=req-1``. Control characters are escaped."""
    parts = [_when(event.ts), f"#{event.seq}", event.kind, event.decision, event.reason]
    target = f"{event.host}{event.path}"
    if event.method or target:
        parts.append(f"{event.method} {target}".strip())
    if event.status:
        parts.append(str(event.status))
    if event.kind == "request":
        parts.append(f"{event.latency_ms:.1f}ms")
    if event.client_ip:
        parts.append(event.client_ip)
    labelled = (("sub", event.subject), ("tenant", event.tenant), ("cred", event.credential_id),
                ("client", event.client_id), ("rid", event.request_id))
    parts.extend(f"{label}={value}" for label, value in labelled if value)
    if event.extra:
        try:
            parts.append(json.dumps(event.extra, sort_keys=True, separators=(",", ":"), default=repr))
        except (TypeError, ValueError):
            parts.append(repr(event.extra))
    return " ".join(_printable(p) for p in parts)
