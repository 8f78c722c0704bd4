"""Durable quotas for several nodes: Redis decides, the shared database remembers.

With ``redis:`` every node counts quotas in Redis (one atomic script per request,
`RedisQuota`), which is fast and shared but, by default, not durable: a Redis restart
or eviction would hand every tenant a fresh month. With ``storage.url`` as well, the
counts are also kept in the shared database (PostgreSQL), in the ``traffic`` store:

- `LedgeredQuota` writes each node's latest view of every counter it touched to the
  ledger every `flush_seconds` (write-behind, off the event loop). The ledger keeps the
  highest count any node reported for a (key, period), so nodes flushing in any order
  never lower it.
- The first time a node uses a (key, period) it reads the ledger and hands the value to
  the script as a *seed*; afterwards the seed is the last count the node saw. The script
  uses the seed only when the Redis key does not exist, so a counter Redis lost is
  restored to what was last seen instead of starting from zero.

Bounds: a Redis loss forgets at most what was counted since the nodes' last views (the
requests in flight and, for keys a node had not used, since the last flush); a refund
(negative cost) may not reach the ledger, so it can over-count by refunds, never
under-count by admitted requests. A ledger outage changes no decision: Redis stays the
authority, the failure is logged and the changes wait (bounded) for the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from portcullis.storage.engine import StorageConfig, external_engine
from portcullis.traffic.protocols import QuotaDecision

log = logging.getLogger("portcullis.traffic")

metadata = sa.MetaData()
quota_ledger = sa.Table(
    "quota_ledger", metadata,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("period", sa.String(32), primary_key=True),
    sa.Column("used", sa.BigInteger, nullable=False),
    sa.Column("resets_at", sa.Float, nullable=False),
)
sa.Index("ix_quota_ledger_resets_at", quota_ledger.c.resets_at)


class QuotaLedger:
    """Quota counts per (key, period) in a SQL database; thread-safe (SQLAlchemy pool).

    Called from worker threads only (`LedgeredQuota` uses `asyncio.to_thread`)."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        ins = dialect.insert(quota_ledger)
        greatest = sa.func.greatest if engine.dialect.name == "postgresql" else sa.func.max
        # Highest count wins: nodes report their own views, in any order.
        self._upsert = ins.on_conflict_do_update(
            index_elements=[quota_ledger.c.key, quota_ledger.c.period],
            set_={"used": greatest(quota_ledger.c.used, ins.excluded.used), "resets_at": ins.excluded.resets_at})

    @classmethod
    def open(cls, data_dir: Path) -> QuotaLedger | None:
        """The ledger in the shared database `data_dir` is bound to (``storage.url``),
        migrated as ``storage.auto_migrate`` says; None when there is none."""
        from portcullis.storage.migrations import ensure_schema

        bound = external_engine(data_dir)
        if bound is None:
            return None
        engine, storage = bound
        try:
            ensure_schema(engine, storage or StorageConfig(), ["traffic"])
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def read(self, key: str, period: str) -> int:
        """The recorded count of (`key`, `period`); 0 if none."""
        with self._engine.connect() as conn:
            used = conn.execute(sa.select(quota_ledger.c.used).where(
                quota_ledger.c.key == key, quota_ledger.c.period == period)).scalar()
        return int(used) if used is not None else 0

    def record(self, rows: list[tuple[str, str, int, float]]) -> None:
        """Raise each (key, period) to at least `used`, in one transaction; drop ended periods."""
        if not rows:
            return
        with self._engine.begin() as conn:
            conn.execute(self._upsert, [{"key": k, "period": p, "used": u, "resets_at": r} for k, p, u, r in rows])
            conn.execute(sa.delete(quota_ledger).where(quota_ledger.c.resets_at <= self._clock()))

    def close(self) -> None:
        self._engine.dispose()


class SeededQuota(Protocol):
    """What `LedgeredQuota` needs of the shared counter (`RedisQuota`)."""

    async def consume_seeded(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1, *,
                             seed: int = 0) -> tuple[QuotaDecision, bool]:
        """Consume; a missing counter starts from `seed`. Also: whether it was restored so."""
        ...

    async def raise_to(self, key: str, period: str, floor: int) -> int:
        """Raise an existing counter to at least `floor`; the count after."""
        ...

    async def close(self) -> None: ...


class LedgeredQuota:
    """`QuotaBackend`: a shared counter (`RedisQuota`) whose counts outlive it (see the module doc)."""

    def __init__(self, shared: SeededQuota, ledger: QuotaLedger, *, flush_seconds: float = 1.0,
                 max_keys: int = 1_000_000, read_timeout: float = 0.2,
                 clock: Callable[[], float] = time.time) -> None:
        self._shared = shared
        self._read_timeout = read_timeout
        self._ledger = ledger
        self._flush_seconds = flush_seconds
        self._max_keys = max_keys
        self._clock = clock
        # (key, period) -> (last count seen, resets_at): the seed, and what to flush.
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._failing = False
        self._closed = False

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        k = (key, period)
        known = self._seen.get(k)
        seed = known[0] if known is not None else await self._read(key, period)
        decision, restored = await self._shared.consume_seeded(key, period, limit, resets_at, cost, seed=seed)
        if restored and known is not None:
            # Redis had lost the counter and it restarted from this node's own view, which
            # lags what the other nodes counted since; the ledger may know more. Raise the
            # counter to the ledger's count plus what this request just added.
            best = await self._read(key, period)
            if best > seed:
                used = await self._shared.raise_to(key, period, best + max(0, decision.used - seed))
                decision = QuotaDecision(decision.allowed, used, decision.limit, decision.resets_at)
        if len(self._seen) >= self._max_keys and k not in self._seen:
            self._drop_ended()
        self._seen[k] = (decision.used, resets_at)
        self._dirty.add(k)
        return decision

    async def _read(self, key: str, period: str) -> int:
        """The ledger's count, or 0 if the database does not answer within `read_timeout`:
        a request never waits on a slow database for what is only a seed."""
        try:
            async with asyncio.timeout(self._read_timeout):
                return await asyncio.to_thread(self._ledger.read, key, period)
        except (SQLAlchemyError, TimeoutError) as exc:
            # Redis decides either way; without the ledger a lost counter restarts lower.
            log.error("quota ledger unreadable (%s): %s/%s not seeded", type(exc).__name__, key, period)
            return 0

    def start(self) -> None:
        """Begin flushing every `flush_seconds` (inside the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="quota-ledger")

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._flush_seconds)
            await self.flush()

    async def flush(self) -> None:
        """Write every changed count now (kept for the next flush if the database fails)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        rows = [(k[0], k[1], e[0], e[1]) for k in dirty if (e := self._seen.get(k)) is not None]
        try:
            await asyncio.to_thread(self._ledger.record, rows)
        except SQLAlchemyError as exc:
            if not self._failing:
                log.error("ALERT quota ledger write failed (%s); retrying every %.1f s",
                          type(exc).__name__, self._flush_seconds)
            self._failing = True
            self._dirty |= dirty
            return
        if self._failing:
            log.warning("quota ledger writes recovered")
            self._failing = False
        self._drop_ended()

    def _drop_ended(self) -> None:
        now = self._clock()
        for k in [k for k, (_, resets_at) in self._seen.items() if resets_at <= now and k not in self._dirty]:
            del self._seen[k]
        if len(self._seen) >= self._max_keys:
            # Still full of live periods: forget the views not waiting for a flush (they
            # are only seeds; a key used again re-reads the ledger).
            for k in [k for k in self._seen if k not in self._dirty]:
                del self._seen[k]

    async def close(self) -> None:
        """Flush what is left and close the ledger; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        await self._shared.close()
        await asyncio.to_thread(self._ledger.close)
