"""A local disk spool for audit events the database could not take.

When the audit store is down (PostgreSQL restarting, a network cut), the `AuditWriter`
puts each batch it cannot append into this spool — a directory of files, one per batch,
each written to a temporary name, fsynced, renamed into place and the directory fsynced —
and acknowledges the batch: from then on it survives a crash or a restart of the process
just as a committed batch does. When the store answers again, the writer *drains* the spool
oldest first, so the chain keeps submission order, and removes each file once its batch is
committed.

Exactly once, as far as it can be known: a batch whose append failed may in fact have been
committed (the connection broke after COMMIT was sent), and a crash between a commit and
the file's removal leaves a committed batch on disk. Before appending such an *uncertain*
batch the writer looks for its first and last events (`event_key`: every field but the
chain's and the spool tag) among the last `SPOOL_DEDUP_WINDOW` events of the chain, and
drops the file if they are there. (Further back than that a duplicate is possible; never a
loss.) Each spooled event carries its batch's id in ``extra["spool"]``: the log shows which
events waited on local disk.

Files are 0600 in a 0700 directory: events carry client IPs and subjects. The spool is
bounded (`max_bytes`); when full, `put` refuses and the writer falls back to holding events
in memory, whose own bound makes the gateway refuse requests (fail closed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portcullis.audit.chain import FLOAT_FIELDS, INT_FIELDS, STR_FIELDS
from portcullis.audit.events import AuditEvent

log = logging.getLogger("portcullis.audit")

SPOOL_DEDUP_WINDOW = 4096
SPOOL_KEY = "spool"  # extra[SPOOL_KEY]: the id of the spooled batch an event came through
_SUFFIX = ".batch"
_FORMAT = 1
_FIELDS: tuple[str, ...] = (*FLOAT_FIELDS, *STR_FIELDS, *INT_FIELDS)


class SpoolFullError(Exception):
    """The spool has reached its size bound; the batch was not spooled."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """One batch on disk. `uncertain`: an append of it was attempted and failed, so it may
    already be in the store (check before appending again)."""

    name: str
    batch_id: str
    events: list[AuditEvent]
    uncertain: bool


def event_key(ev: AuditEvent) -> tuple[Any, ...]:
    """What identifies an event's content: every field but the chain's and the spool tag."""
    extra = {k: v for k, v in ev.extra.items() if k != SPOOL_KEY}
    return (*(getattr(ev, name) for name in _FIELDS), json.dumps(extra, sort_keys=True, separators=(",", ":")))


def _encode(ev: AuditEvent) -> dict[str, Any]:
    d: dict[str, Any] = {name: getattr(ev, name) for name in _FIELDS}
    d["extra"] = ev.extra
    return d


def _decode(d: dict[str, Any]) -> AuditEvent:
    return AuditEvent(**{name: d[name] for name in _FIELDS}, extra=dict(d["extra"]))


class AuditSpool:
    """Batches of audit events in files under `directory` (created 0700).

    `put` is durable when it returns. `batches` lists what is there, oldest first;
    `remove` deletes one after it is committed. Used by one writer thread at a time;
    the lock only guards the byte count against `pending`/`size` readers.
    """

    def __init__(self, directory: Path, *, max_bytes: int = 1 << 30) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        for stale in directory.glob("*.tmp"):  # a put interrupted by a crash: never acknowledged
            stale.unlink(missing_ok=True)
        names = self._names()
        self._next = int(names[-1].split("-", 1)[0]) + 1 if names else 1
        self._bytes = sum(self._size(n) for n in names)
        self._count = len(names)
        # After a restart the oldest file may have been committed just before the crash.
        self._first_uncertain = names[0] if names else None

    @classmethod
    def claim(cls, root: Path, *, max_bytes: int = 1 << 30, slots: int = 64) -> AuditSpool:
        """The spool of the first free *slot* under `root` (``root/0``, ``root/1``, ...),
        held with an exclusive lock until `close`: processes sharing a data directory
        (``serve --workers N``) never drain each other's spool, and a restarted process
        takes a slot back and drains what its predecessor left."""
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for slot in range(slots):
            directory = root / str(slot)
            directory.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                spool = cls(directory, max_bytes=max_bytes)
            except BaseException:
                os.close(fd)
                raise
            spool._lock_fd = fd
            return spool
        raise OSError(f"{root}: all {slots} audit spool slots are in use")

    def close(self) -> None:
        """Release the slot lock (see `claim`). Idempotent."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _names(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob(f"*{_SUFFIX}"))

    def _size(self, name: str) -> int:
        try:
            return (self.directory / name).stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def pending(self) -> int:
        """Batches waiting on disk."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes waiting on disk."""
        return self._bytes

    def put(self, events: list[AuditEvent], *, uncertain: bool) -> str:
        """Write `events` as one batch, durably; returns the batch id. Tags every event
        with the id (``extra["spool"]``) so a committed copy can be recognised.

        Raises `SpoolFullError` past `max_bytes`, OSError if the disk fails (nothing is
        acknowledged then: the caller keeps the events).
        """
        batch_id = secrets.token_hex(8)
        for ev in events:
            ev.extra[SPOOL_KEY] = batch_id
        header = {"v": _FORMAT, "id": batch_id, "uncertain": uncertain, "count": len(events)}
        body = "\n".join(json.dumps(x, separators=(",", ":"), allow_nan=False)
                         for x in (header, *(_encode(e) for e in events))) + "\n"
        data = body.encode("utf-8")
        if self._bytes + len(data) > self.max_bytes:
            for ev in events:
                ev.extra.pop(SPOOL_KEY, None)
            raise SpoolFullError(f"audit spool {self.directory} is full ({self._bytes} bytes)")
        name = f"{self._next:016d}-{batch_id}{_SUFFIX}"
        tmp = self.directory / (name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / name)
            self._fsync_dir()
        except BaseException:
            tmp.unlink(missing_ok=True)
            for ev in events:
                ev.extra.pop(SPOOL_KEY, None)
            raise
        self._next += 1
        with self._lock:
            self._bytes += len(data)
            self._count += 1
        return batch_id

    def batches(self) -> list[str]:
        """The names of the spooled batches, oldest first."""
        return self._names()

    def read(self, name: str) -> SpooledBatch | None:
        """One batch; None (and the file set aside as ``.corrupt``) if it cannot be read."""
        path = self.directory / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            header = json.loads(lines[0])
            if header.get("v") != _FORMAT or header.get("count") != len(lines) - 1:
                raise ValueError("bad header or truncated")
            events = [_decode(json.loads(line)) for line in lines[1:]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.error("audit spool file %s is unreadable (%s): set aside as .corrupt", path, type(exc).__name__)
            self._forget(name, path.with_suffix(".corrupt"))
            return None
        uncertain = bool(header.get("uncertain")) or name == self._first_uncertain
        return SpooledBatch(name, str(header["id"]), events, uncertain)

    def remove(self, name: str) -> None:
        """Delete a batch that is now in the store."""
        self._forget(name, None)

    def _forget(self, name: str, rename_to: Path | None) -> None:
        size = self._size(name)
        path = self.directory / name
        if rename_to is not None:
            os.replace(path, rename_to)
        else:
            path.unlink(missing_ok=True)
        self._fsync_dir()
        if name == self._first_uncertain:
            self._first_uncertain = None
        with self._lock:
            self._bytes = max(0, self._bytes - size)
            self._count = max(0, self._count - 1)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
