"""Calendar quota periods (midnight, month end, DST) and the SQLite quota store."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from portcullis.traffic.protocols import QuotaBackend
from portcullis.traffic.quota import SqliteQuotaBackend, period_window

BERLIN = ZoneInfo("Europe/Berlin")


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_day_key_and_reset_at_local_midnight() -> None:
    key, start, resets = period_window("day", at("2026-11-29T23:59:59.5+01:00"), BERLIN)
    assert key == "2026-11-29"
    assert start == at("2026-11-29T00:00:00+01:00")
    assert resets == at("2026-11-30T00:00:00+01:00")
    # Exactly at the boundary the next day has begun; half a second before, not yet.
    assert period_window("day", resets, BERLIN)[0] == "2026-11-30"
    assert period_window("day", resets - 0.001, BERLIN)[0] == "2026-11-29"
    # The same instant is another day in another zone.
    assert period_window("day", at("2026-11-29T23:30:00+01:00"), ZoneInfo("UTC"))[0] == "2026-11-29"
    assert period_window("day", at("2026-11-30T00:30:00+01:00"), ZoneInfo("UTC"))[0] == "2026-11-29"


@pytest.mark.parametrize(("instant", "key", "next_key"), [
    ("2026-11-30T23:59:59+01:00", "2026-11", "2026-12"),
    ("2026-12-31T23:59:59+01:00", "2026-12", "2027-01"),
    ("2028-02-29T12:00:00+01:00", "2028-02", "2028-03"),
])
def test_month_key_and_reset_at_month_end(instant: str, key: str, next_key: str) -> None:
    k, start, resets = period_window("month", at(instant), BERLIN)
    assert k == key
    assert datetime.fromtimestamp(start, BERLIN).day == 1
    assert period_window("month", resets, BERLIN)[0] == next_key
    assert period_window("month", resets - 0.001, BERLIN)[0] == key


def test_dst_days_last_23_and_25_hours() -> None:
    k, start, resets = period_window("day", at("2026-03-29T12:00:00+02:00"), BERLIN)
    assert (k, resets - start) == ("2026-03-29", 23 * 3600)
    k, start, resets = period_window("day", at("2026-10-25T12:00:00+01:00"), BERLIN)
    assert (k, resets - start) == ("2026-10-25", 25 * 3600)
    # The repeated hour 02:00-03:00 on 2026-10-25 is still the same day, both times.
    assert period_window("day", at("2026-10-25T02:30:00+02:00"), BERLIN)[0] == "2026-10-25"
    assert period_window("day", at("2026-10-25T02:30:00+01:00"), BERLIN)[0] == "2026-10-25"


def test_a_day_whose_midnight_does_not_exist_starts_at_the_transition() -> None:
    # Chile moves its clocks from 00:00 to 01:00 on 2026-09-06: there is no midnight.
    santiago = ZoneInfo("America/Santiago")
    k, _, resets = period_window("day", at("2026-09-05T23:30:00-04:00"), santiago)
    assert k == "2026-09-05"
    assert resets == at("2026-09-06T01:00:00-03:00") == at("2026-09-06T00:00:00-04:00")
    assert period_window("day", resets, santiago)[0] == "2026-09-06"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def open_store(path: Path, clock: Clock) -> SqliteQuotaBackend:
    return SqliteQuotaBackend(path, clock=clock)


async def test_counts_up_to_the_limit_and_refuses_without_counting(tmp_path: Path) -> None:
    clock = Clock(at("2026-11-29T10:00:00+01:00"))
    q: QuotaBackend = open_store(tmp_path / "t.db", clock)
    resets = at("2026-11-30T00:00:00+01:00")
    for i in range(3):
        d = await q.consume("tenant:acme", "2026-11-29", 3, resets)
        assert d.allowed and d.used == i + 1 and d.resets_at == resets
    d = await q.consume("tenant:acme", "2026-11-29", 3, resets)
    assert not d.allowed and d.used == 3
    assert (await q.consume("tenant:globex", "2026-11-29", 3, resets)).used == 1  # keys apart
    assert (await q.consume("tenant:acme", "2026-11-30", 3, resets + 86400)).used == 1  # periods apart
    await q.close()


async def test_negative_cost_gives_back_and_never_goes_below_zero(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    q = open_store(tmp_path / "t.db", clock)
    await q.consume("k", "p", 2, 5000.0)
    await q.consume("k", "p", 2, 5000.0)
    assert not (await q.consume("k", "p", 2, 5000.0)).allowed
    assert (await q.consume("k", "p", 2, 5000.0, cost=-1)).used == 1
    assert (await q.consume("k", "p", 2, 5000.0)).allowed
    assert (await q.consume("k", "p", 2, 5000.0, cost=-5)).used == 0
    await q.close()


async def test_counts_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    q = open_store(tmp_path / "t.db", clock)
    for _ in range(4):
        await q.consume("client:c1", "2026-11", 5, 5000.0)
    assert q.first_seen("client:c1", 1000.0) == 1000.0
    await q.close()  # a graceful stop flushes
    q2 = open_store(tmp_path / "t.db", clock)
    assert (await q2.consume("client:c1", "2026-11", 5, 5000.0)).used == 5
    assert not (await q2.consume("client:c1", "2026-11", 5, 5000.0)).allowed
    assert q2.first_seen("client:c1", 2000.0) == 1000.0  # remembered, not reset
    await q2.close()


async def test_periodic_flush_writes_behind(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    q = SqliteQuotaBackend(tmp_path / "t.db", flush_seconds=0.02, clock=clock)
    q.start()
    await q.consume("k", "p", 10, 5000.0)
    await q.consume("k", "p", 10, 5000.0)
    import asyncio

    for _ in range(100):  # the flush task writes within a few intervals
        await asyncio.sleep(0.01)
        with sqlite3.connect(tmp_path / "t.db") as db:
            row = db.execute("SELECT used FROM quota_counters WHERE key='k'").fetchone()
        if row is not None and row[0] == 2:
            break
    assert row == (2,)
    await q.close()


async def test_ended_periods_are_dropped_from_memory_and_disk(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    q = open_store(tmp_path / "t.db", clock)
    await q.consume("k", "old", 10, 1500.0)
    q.flush()
    clock.t = 1600.0
    await q.consume("k", "new", 10, 9000.0)
    q.flush()
    assert ("k", "old") not in q._counts
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT period FROM quota_counters").fetchall() == [("new",)]
    await q.close()


async def test_full_table_refuses_new_keys(tmp_path: Path) -> None:
    q = SqliteQuotaBackend(tmp_path / "t.db", max_keys=2, clock=Clock(1000.0))
    assert (await q.consume("a", "p", 10, 5000.0)).allowed
    assert (await q.consume("b", "p", 10, 5000.0)).allowed
    assert not (await q.consume("c", "p", 10, 5000.0)).allowed  # fail closed, bounded memory
    assert (await q.consume("a", "p", 10, 5000.0)).allowed
    await q.close()
