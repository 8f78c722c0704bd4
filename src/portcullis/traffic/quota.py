"""Quotas: requests per tenant or client per calendar day or month, in a time zone.

A quota period is a calendar day or month *in the configured zone*: the key of the
period that contains an instant is ``2026-11-29`` (day) or ``2026-11`` (month), and
the period ends exactly at the next local midnight (or the first of the next month),
whatever the UTC offset does in between (DST: a day may last 23 or 25 hours; where
midnight itself does not exist, the day starts at the transition).

`SqliteQuotaBackend` is the single-node `QuotaBackend`: counters live in memory and
are written behind to SQLite in the data directory every `flush_seconds` (and on
close), so they survive restarts. A graceful stop loses nothing; a crash (kill -9)
may forget the requests counted since the last flush, at most `flush_seconds` worth
(quotas then under-count, never over-count). It also remembers when a principal was
first seen (`first_seen`), for the warm-up of `portcullis.traffic.adaptive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from portcullis.traffic.protocols import QuotaDecision

log = logging.getLogger("portcullis.traffic")

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")


def period_window(period: Period, now: float, tz: ZoneInfo) -> tuple[str, float, float]:
    """The period containing epoch instant `now` in zone `tz`: (key, starts_at, resets_at).

    `resets_at` is the epoch second at which the next period begins (the local
    midnight that starts the next day or month). Local midnights are built as
    wall-clock datetimes in `tz`; zoneinfo maps a wall time skipped by DST (fold=0)
    with the offset before the gap, i.e. to the instant of the transition, which is
    when the new day really starts.
    """
    local = datetime.fromtimestamp(now, tz)
    d = local.date()
    if period == "day":
        start, nxt = d, d + timedelta(days=1)
        key = d.isoformat()
    else:
        start = date(d.year, d.month, 1)
        nxt = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
        key = f"{d.year:04d}-{d.month:02d}"
    return key, _midnight(start, tz), _midnight(nxt, tz)


def _midnight(d: date, tz: ZoneInfo) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_counters (
    key TEXT NOT NULL,
    period TEXT NOT NULL,
    used INTEGER NOT NULL,
    resets_at REAL NOT NULL,
    PRIMARY KEY (key, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS first_seen (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
"""


class SqliteQuotaBackend:
    """`QuotaBackend` for one node: memory counters, written behind to SQLite.

    Not for several processes sharing one data directory (each would count on its
    own); those need the shared backend. `start()` begins the periodic flush inside
    the event loop; `close()` flushes and closes. Without `start()` (tests, tools),
    call `flush()` yourself.

    Memory: one entry per (key, period) in use; entries of periods that have ended
    are dropped at each flush. `max_keys` bounds it: past it, a key not yet in memory
    is refused (fail closed) rather than let quota state grow without bound.
    """

    def __init__(self, path: Path, *, flush_seconds: float = 1.0, max_keys: int = 1_000_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._flush_seconds = flush_seconds
        self._max_keys = max_keys
        self._clock = clock
        # Two connections: the event loop only reads (a key's first use), a worker
        # thread writes; WAL lets the reads go on while a flush commits.
        self._wdb = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._wdb.execute("PRAGMA journal_mode=WAL")
        self._wdb.execute("PRAGMA synchronous=NORMAL")
        self._wdb.executescript(_SCHEMA)
        self._rdb = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._counts: dict[tuple[str, str], tuple[int, float]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._seen: dict[str, float] = {}
        self._seen_dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False

    # -- QuotaBackend ------------------------------------------------------------

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        """Count `cost` against (`key`, `period`) unless that would pass `limit`.

        A negative `cost` gives back what an earlier call counted (the limit stage
        does this when another limit refused the same request); it never goes below 0.
        """
        return self.consume_now(key, period, limit, resets_at, cost)

    def consume_now(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        """`consume`, synchronously (memory only; the first use of a key reads SQLite once)."""
        k = (key, period)
        entry = self._counts.get(k)
        if entry is None:
            if len(self._counts) >= self._max_keys:
                self._drop_ended(self._clock())
                if len(self._counts) >= self._max_keys:
                    log.error("quota table full (%d keys): refusing new keys", self._max_keys)
                    return QuotaDecision(False, 0, limit, resets_at)
            row = self._rdb.execute("SELECT used FROM quota_counters WHERE key = ? AND period = ?", k).fetchone()
            entry = (int(row[0]) if row else 0, resets_at)
            self._counts[k] = entry
        used = entry[0]
        if cost > 0 and used + cost > limit:
            return QuotaDecision(False, used, limit, resets_at)
        used = max(0, used + cost)
        self._counts[k] = (used, resets_at)
        self._dirty.add(k)
        return QuotaDecision(True, used, limit, resets_at)

    async def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._flush_async()
        self._closed = True
        self._rdb.close()
        self._wdb.close()

    # -- first seen (adaptive warm-up) ---------------------------------------------

    def first_seen(self, key: str, now: float) -> float:
        """When `key` was first seen (recording `now` if never); persisted with the quotas."""
        at = self._seen.get(key)
        if at is None:
            row = self._rdb.execute("SELECT at FROM first_seen WHERE key = ?", (key,)).fetchone()
            if row is not None:
                at = float(row[0])
            else:
                at = now
                self._seen_dirty.add(key)
            if len(self._seen) >= self._max_keys:
                self._seen.clear()  # a cache of the table: dropping it only costs re-reads
            self._seen[key] = at
        return at

    # -- persistence ---------------------------------------------------------------

    def start(self) -> None:
        """Begin flushing every `flush_seconds` (call inside the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._flush_seconds)
            await self._flush_async()

    async def _flush_async(self) -> None:
        rows, seen_rows = self._snapshot()
        try:
            await asyncio.to_thread(self._write, rows, seen_rows)
        except sqlite3.Error as exc:  # keep counting in memory; the next flush writes them
            log.error("quota flush failed: %s", type(exc).__name__)
            self._dirty.update((r[0], r[1]) for r in rows)
            self._seen_dirty.update(k for k, _ in seen_rows)
            return
        self._drop_ended(self._clock())

    def flush(self) -> None:
        """Write every changed counter and first-seen time now; drop ended periods."""
        self._write(*self._snapshot())
        self._drop_ended(self._clock())

    def _snapshot(self) -> tuple[list[tuple[str, str, int, float]], list[tuple[str, float]]]:
        # On the event loop: take the changes, so counting goes on while they are written.
        dirty, self._dirty = self._dirty, set()
        seen_dirty, self._seen_dirty = self._seen_dirty, set()
        rows = [(k[0], k[1], e[0], e[1]) for k in dirty if (e := self._counts.get(k)) is not None]
        seen_rows = [(k, self._seen[k]) for k in seen_dirty if k in self._seen]
        return rows, seen_rows

    def _write(self, rows: list[tuple[str, str, int, float]], seen_rows: list[tuple[str, float]]) -> None:
        # In a worker thread, on the write connection only.
        now = self._clock()
        db = self._wdb
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO quota_counters (key, period, used, resets_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, period) DO UPDATE SET used = excluded.used, resets_at = excluded.resets_at",
                rows)
            db.executemany("INSERT OR IGNORE INTO first_seen (key, at) VALUES (?, ?)", seen_rows)
            db.execute("DELETE FROM quota_counters WHERE resets_at <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _drop_ended(self, now: float) -> None:
        ended = [k for k, (_, resets_at) in self._counts.items() if resets_at <= now and k not in self._dirty]
        for k in ended:
            self._counts.pop(k, None)
