"""Group-commit writer: the request path hands events over without waiting; one thread
makes them durable in batches (one transaction and one fsync per batch). With a spool
(`portcullis.audit.spool`), batches the store cannot take wait on local disk and drain
when it returns."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from portcullis.audit.chain import normalize_event
from portcullis.audit.events import AuditEvent
from portcullis.audit.spool import SPOOL_DEDUP_WINDOW, AuditSpool, SpoolFullError, event_key
from portcullis.audit.store import AuditStore

log = logging.getLogger("portcullis.audit")

# After close() gives up waiting, how long to let an in-flight store call finish.
_ABORT_GRACE = 10.0
# How often an idle writer checks whether the main thread has exited without close().
_IDLE_POLL = 0.25


def _brief(exc: BaseException) -> str:
    # One line, bounded: store errors are logged at every retry. The SQLite store
    # hides bound parameters, so messages carry SQL text but no event data.
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class AuditWriter:
    """Batches submitted events into `store.append_batch` calls on its own thread.

    An event is *acknowledged as written* once `on_durable` has been called with the
    batch containing it; that happens only after `append_batch` returned, i.e. after a
    durable commit. `on_durable` runs on the writer thread, in submission order, and
    must be quick and thread-safe (use ``loop.call_soon_threadsafe`` to reach a loop).

    Store errors never drop events: the failing batch is kept and retried with
    exponential backoff (`retry_initial` doubling up to `retry_max` seconds) while new
    submissions accumulate up to `max_backlog`. Only `close` giving up (its timeout)
    abandons unwritten events, and that is logged as an error with their count.

    With a `spool`, a batch the store refuses is written to local disk instead (durably)
    and acknowledged — `on_durable` then means "in the store or in the spool", and the
    events carry no chain fields yet. While the spool holds anything, new batches join it
    (the chain keeps submission order) and the writer retries draining it, oldest first,
    with the same backoff. Batches left in the spool by a previous process are drained
    first. If the spool is full or the disk fails, the writer falls back to retrying in
    memory as without one.
    """

    def __init__(
        self,
        store: AuditStore,
        *,
        max_batch: int = 512,
        max_backlog: int = 100_000,
        on_durable: Callable[[list[AuditEvent]], None] | None = None,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        linger: float = 0.002,
        spool: AuditSpool | None = None,
    ) -> None:
        if max_batch < 1 or max_backlog < 1:
            raise ValueError("max_batch and max_backlog must be >= 1")
        self._store = store
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._on_durable = on_durable
        self._retry_initial = retry_initial
        self._retry_max = max(retry_max, retry_initial)
        # Group commit: after the first event of a batch, wait this long (once) for more
        # before writing. Each batch costs a transaction, an fsync and a signature, so
        # under load a short linger cuts the cost per event several times; it delays
        # only the acknowledgement, never a request.
        self._linger = max(0.0, linger)
        # None is the stop marker queued by close(); SimpleQueue.put never blocks.
        self._queue: queue.SimpleQueue[AuditEvent | None] = queue.SimpleQueue()
        # Serializes producers only (submit/close); the writer thread never takes it,
        # so a submitter can never wait on the store.
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._durable = 0  # written by the writer thread only, under _durable_cond
        self._durable_cond = threading.Condition()
        self._closed = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._spool = spool
        self._drain_delay = retry_initial
        self._drain_at = 0.0  # monotonic time of the next drain attempt

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_backlog(self) -> int:
        return self._max_backlog

    @property
    def backlog(self) -> int:
        """Events submitted but not yet durable (including the batch being written)."""
        return self._submitted - self._durable

    @property
    def durable_count(self) -> int:
        """Events made durable (and acknowledged) since this writer was created."""
        return self._durable

    @property
    def submitted_count(self) -> int:
        return self._submitted

    @property
    def last_error(self) -> str | None:
        """The store error being retried right now, or None while writes succeed."""
        return self._last_error

    @property
    def spooled_batches(self) -> int:
        """Batches acknowledged but still waiting in the local spool for the store."""
        return self._spool.pending if self._spool is not None else 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the writer thread. Idempotent; RuntimeError after `close`."""
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("audit writer is closed")
            self._start_thread()

    def _start_thread(self) -> None:
        if self._thread is None:
            # Not a daemon: pending events must be written before the process exits.
            self._thread = threading.Thread(target=self._run, name="portcullis-audit-writer", daemon=False)
            self._thread.start()

    def submit(self, event: AuditEvent) -> bool:
        """Queue `event` for writing; never blocks on the store or the writer thread.

        May be called before `start` (events wait in the queue). Normalizes the event in
        place (`portcullis.audit.chain.normalize_event`); the writer owns it afterwards.

        Returns False (event not taken) if the backlog is at `max_backlog` or the writer
        is closed: the caller should refuse the work it wanted to audit. Raises
        ValueError if the event cannot be recorded faithfully (see
        `portcullis.audit.chain.normalize_event`); checked here so that one bad event
        cannot wedge the writer in endless retries.
        """
        normalize_event(event)
        with self._submit_lock:
            if self._closed or self._submitted - self._durable >= self._max_backlog:
                return False
            self._submitted += 1
            self._queue.put(event)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event submitted before this call is durable.

        Returns False on timeout. Blocking: do not call on the event loop.
        """
        target = self._submitted
        with self._durable_cond:
            return self._durable_cond.wait_for(lambda: self._durable >= target, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Refuse new events, write everything already submitted, end the thread.

        Returns True if every submitted event is durable. If that takes longer than
        `timeout` seconds (None: no limit), stops retrying, lets an in-flight store
        call finish (up to 10 s), logs how many events were not written and returns
        False. Idempotent. Blocking: do not call on the event loop.
        """
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
            if self._thread is None and self._submitted > self._durable:
                self._start_thread()  # closed before start(): still write what was submitted
        thread = self._thread
        if thread is None:
            self._close_spool()
            return True
        thread.join(timeout)
        if thread.is_alive():
            self._abort.set()
            thread.join(_ABORT_GRACE)
        if not thread.is_alive():
            self._close_spool()
        return not thread.is_alive() and self._durable == self._submitted

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("audit writer thread crashed")
            raise
        finally:
            lost = self._submitted - self._durable
            if lost:
                log.error("audit writer stopped with %d submitted events NOT written", lost)

    def _next(self) -> AuditEvent | None:
        """Block for the next item; None at the stop marker or if the main thread exited.

        While the spool holds batches, drains it whenever a drain is due."""
        while True:
            if self._spool is not None and self._spool.pending and time.monotonic() >= self._drain_at:
                self._drain()
            try:
                return self._queue.get(timeout=self._idle_timeout())
            except queue.Empty:
                # Without this a forgotten close() would hang interpreter exit, which
                # joins non-daemon threads; by now everything submitted is written.
                if not threading.main_thread().is_alive():
                    return None
                if self._abort.is_set():
                    return None

    def _idle_timeout(self) -> float:
        if self._spool is not None and self._spool.pending:
            return min(_IDLE_POLL, max(0.001, self._drain_at - time.monotonic()))
        return _IDLE_POLL

    def _loop(self) -> None:
        stop = False
        while not stop and not self._abort.is_set():
            first = self._next()
            if first is None:
                if self._spool is not None and self._spool.pending and not self._abort.is_set():
                    self._drain()  # one last try; what stays is safe on disk for the next start
                return
            batch = [first]
            if self._linger and self._queue.qsize() < self._max_batch - 1:
                time.sleep(self._linger)
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if not self._write(batch):
                return

    def _acknowledge(self, batch: list[AuditEvent]) -> None:
        if self._on_durable is not None:
            try:
                self._on_durable(batch)
            except Exception:
                # The events are durable; a failing acknowledgement must not rewrite them.
                log.exception("audit on_durable callback failed")
        with self._durable_cond:
            self._durable += len(batch)
            self._durable_cond.notify_all()

    def _spool_put(self, batch: list[AuditEvent], *, uncertain: bool) -> bool:
        """Spool `batch` and acknowledge it; False if the spool cannot take it."""
        assert self._spool is not None
        try:
            self._spool.put(batch, uncertain=uncertain)
        except (SpoolFullError, OSError) as exc:
            log.error("audit spool cannot take %d events (%s): holding them in memory", len(batch), _brief(exc))
            return False
        self._acknowledge(batch)
        return True

    def _drain(self) -> bool:
        """Append spooled batches, oldest first, until the spool is empty (True) or the
        store fails (False; the next attempt is scheduled with backoff)."""
        assert self._spool is not None
        for name in self._spool.batches():
            if self._abort.is_set():
                return False
            spooled = self._spool.read(name)
            if spooled is None:
                continue  # unreadable: set aside and logged by the spool
            try:
                if not (spooled.uncertain and self._already_stored(spooled.events)):
                    self._store.append_batch(spooled.events, assume_normalized=True)
            except Exception as exc:
                self._last_error = _brief(exc)
                log.error("audit spool drain failed (%d batches waiting), retrying in %.2fs: %s",
                          self._spool.pending, self._drain_delay, self._last_error)
                self._drain_at = time.monotonic() + self._drain_delay
                self._drain_delay = min(self._drain_delay * 2, self._retry_max)
                return False
            self._spool.remove(name)
        if self._last_error is not None:
            log.warning("audit spool drained: the store is back")
        self._last_error = None
        self._drain_delay = self._retry_initial
        self._drain_at = 0.0
        return True

    def _already_stored(self, events: list[AuditEvent]) -> bool:
        """Whether an uncertain batch is already in the store (see `portcullis.audit.spool`)."""
        if not events:
            return True
        tail = {event_key(e) for e in self._store.tail(SPOOL_DEDUP_WINDOW)}
        found = event_key(events[0]) in tail and event_key(events[-1]) in tail
        if found:
            log.warning("audit spool batch of %d events was already committed: not appended again", len(events))
        return found

    def _write(self, batch: list[AuditEvent]) -> bool:
        """Append `batch` until it succeeds; False if aborted first."""
        if self._spool is not None:
            # Spooled batches come first, so the chain keeps submission order.
            if self._spool.pending and (time.monotonic() < self._drain_at or not self._drain()):
                if self._spool_put(batch, uncertain=False):
                    return True
            elif not self._spool.pending:
                try:
                    self._store.append_batch(batch, assume_normalized=True)
                except Exception as exc:
                    self._last_error = _brief(exc)
                    log.error("audit append of %d events failed, spooling to disk: %s", len(batch), self._last_error)
                    self._drain_at = time.monotonic() + self._drain_delay
                    if self._spool_put(batch, uncertain=True):
                        return True
                else:
                    self._last_error = None
                    self._acknowledge(batch)
                    return True
        delay = self._retry_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                self._store.append_batch(batch, assume_normalized=True)
                break
            except Exception as exc:
                self._last_error = _brief(exc)
                log.error("audit append of %d events failed (attempt %d), retrying in %.2fs: %s",
                          len(batch), attempt, delay, self._last_error)
                if self._abort.wait(delay):
                    return False
                delay = min(delay * 2, self._retry_max)
        if attempt > 1:
            log.warning("audit append succeeded after %d attempts", attempt)
        self._last_error = None
        self._acknowledge(batch)
        return True
