"""The quota ledger: shared (Redis) quota counts that outlive Redis, kept in the shared
database (`portcullis.traffic.ledger`). Real servers: the shared PostgreSQL (a throwaway
schema) and the shared Redis (database 15, a fresh key prefix); a SQLite URL too. Each
skips, saying why, when its server is absent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from redis import Redis

from portcullis.storage.engine import StorageConfig, make_engine, sqlite_file_url
from portcullis.storage.migrations import upgrade
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.ledger import LedgeredQuota, QuotaLedger, quota_ledger
from portcullis.traffic.redis_backend import RedisConnection, RedisQuota
from tests.integration.redis_harness import shared_redis_url, unique_prefix
from tests.unit.storage.backends import PgSchema

pytestmark = pytest.mark.services

LIMIT = 100
PERIOD = "2026-11"


def resets_at() -> float:
    return time.time() + 3600


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        engine = make_engine(sqlite_file_url(tmp_path / "shared.db"), StorageConfig())
        upgrade(engine)
    else:
        schema: PgSchema = request.getfixturevalue("fresh_pg")
        engine = schema.engine()
    yield engine
    engine.dispose()


@pytest.fixture
async def redis_conn() -> AsyncIterator[RedisConnection]:
    cfg = RedisConfig(url=shared_redis_url(), key_prefix=unique_prefix(), timeout_ms=2000,
                      connect_timeout_ms=2000, pool_timeout_ms=2000)
    conn = RedisConnection(cfg)
    yield conn
    await conn.close()


def forget_in_redis(conn: RedisConnection) -> None:
    """What a Redis restart (or an eviction) does to the counters: they are gone."""
    r = Redis.from_url(conn.cfg.url)
    keys = list(r.scan_iter(match=conn.prefix + "*"))
    if keys:
        r.delete(*keys)
    r.close()


def test_the_highest_count_any_node_reported_wins(ledger_engine: sa.Engine) -> None:
    ledger = QuotaLedger(ledger_engine)
    r = resets_at()
    ledger.record([("t:acme", PERIOD, 7, r), ("t:beta", PERIOD, 3, r)])
    ledger.record([("t:acme", PERIOD, 5, r)])  # a node with an older view flushes late
    ledger.record([("t:beta", PERIOD, 9, r)])
    assert (ledger.read("t:acme", PERIOD), ledger.read("t:beta", PERIOD), ledger.read("t:none", PERIOD)) == (7, 9, 0)


def test_ended_periods_are_dropped(ledger_engine: sa.Engine) -> None:
    ledger = QuotaLedger(ledger_engine)
    ledger.record([("t:acme", "2020-01", 4, time.time() - 1), ("t:acme", PERIOD, 4, resets_at())])
    ledger.record([("t:beta", PERIOD, 1, resets_at())])
    with ledger_engine.connect() as conn:
        periods = sorted(r.period for r in conn.execute(sa.select(quota_ledger.c.period)))
    assert periods == [PERIOD, PERIOD]


async def _consume(q: LedgeredQuota, n: int, key: str = "t:acme", limit: int = LIMIT) -> list[bool]:
    return [(await q.consume(key, PERIOD, limit, resets_at())).allowed for _ in range(n)]


async def test_a_counter_redis_lost_resumes_from_what_was_seen(ledger_engine: sa.Engine,
                                                          redis_conn: RedisConnection) -> None:
    node = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    assert await _consume(node, 5) == [True] * 5
    await node.flush()
    assert QuotaLedger(ledger_engine).read("t:acme", PERIOD) == 5
    forget_in_redis(redis_conn)
    # The node's own last view seeds the lost counter: it goes on at 6, not 1.
    d = await node.consume("t:acme", PERIOD, LIMIT, resets_at())
    assert (d.allowed, d.used) == (True, 6)
    await node.close()


async def test_a_fresh_node_after_a_redis_loss_reads_the_ledger(ledger_engine: sa.Engine,
                                                          redis_conn: RedisConnection) -> None:
    """Quotas survive losing Redis and every gateway at once: the limit still holds."""
    first = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    assert await _consume(first, 8, limit=10) == [True] * 8
    await first.close()  # flushes
    forget_in_redis(redis_conn)
    second = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    assert await _consume(second, 4, limit=10) == [True, True, False, False]
    d = await second.consume("t:acme", PERIOD, 10, resets_at())
    assert (d.allowed, d.used) == (False, 10)
    await second.close()


async def test_two_nodes_share_the_count_and_the_ledger_keeps_the_total(ledger_engine: sa.Engine,
                                                                 redis_conn: RedisConnection) -> None:
    a = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    b = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    await asyncio.gather(_consume(a, 30), _consume(b, 30))
    await b.flush()
    await a.flush()  # whichever view is older, the ledger keeps the highest
    assert QuotaLedger(ledger_engine).read("t:acme", PERIOD) == 60
    await a.close()
    await b.close()


async def test_an_unreachable_ledger_changes_no_decision(redis_conn: RedisConnection, caplog: pytest.LogCaptureFixture,
                                                   tmp_path: Path) -> None:
    """Redis stays the authority; the failed flush is logged once and its rows kept."""
    dead = make_engine("postgresql://nobody@127.0.0.1:1/none", StorageConfig(connect_timeout_seconds=1))

    node = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(dead))
    with caplog.at_level(logging.ERROR, logger="portcullis.traffic"):
        assert await _consume(node, 3, limit=2) == [True, True, False]
        await node.flush()
        await node.flush()
    alerts = [r for r in caplog.records if "ALERT quota ledger" in r.getMessage()]
    assert len(alerts) == 1
    assert node._dirty == {("t:acme", PERIOD)}
    node._closed = True  # nothing more to write; the engine is disposed by the test

    dead.dispose()


async def test_seed_only_starts_a_missing_counter(redis_conn: RedisConnection) -> None:
    q = RedisQuota(redis_conn)
    d = await q.consume("t:x", PERIOD, LIMIT, resets_at(), seed=40)
    assert d.used == 41
    d = await q.consume("t:x", PERIOD, LIMIT, resets_at(), seed=90)  # exists: the seed is ignored
    assert d.used == 42
    d = await q.consume("t:y", PERIOD, 10, resets_at(), seed=10)  # seeded at the limit: refused
    assert (d.allowed, d.used) == (False, 10)
    assert Redis.from_url(redis_conn.cfg.url).pttl(redis_conn.key("q", PERIOD, "t:y")) > 0  # expires anyway
    with pytest.raises(ValueError, match="seed"):
        await q.consume("t:x", PERIOD, LIMIT, resets_at(), seed=-1)


async def test_a_node_with_an_older_view_restores_the_ledgers_higher_count(ledger_engine: sa.Engine,
                                                                          redis_conn: RedisConnection) -> None:
    """Node a last saw 3, node b then counted to 6 and flushed; Redis loses the counter. a's
    next request restarts it from a's view (3 + 1), then the ledger's 6 lifts it to 7."""
    a = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    b = LedgeredQuota(RedisQuota(redis_conn), QuotaLedger(ledger_engine))
    assert await _consume(a, 3) == [True] * 3
    assert await _consume(b, 3) == [True] * 3
    await a.flush()
    await b.flush()
    forget_in_redis(redis_conn)
    d = await a.consume("t:acme", PERIOD, LIMIT, resets_at())
    assert (d.allowed, d.used) == (True, 7)
    d = await b.consume("t:acme", PERIOD, LIMIT, resets_at())
    assert d.used == 8
    await a.close()
    await b.close()


async def test_a_slow_ledger_delays_no_decision(ledger_engine: sa.Engine, redis_conn: RedisConnection) -> None:
    """A first use reads the ledger for a seed, but never waits past `read_timeout` for it."""
    class SlowLedger(QuotaLedger):
        def read(self, key: str, period: str) -> int:
            time.sleep(1.0)
            return 99

    node = LedgeredQuota(RedisQuota(redis_conn), SlowLedger(ledger_engine), read_timeout=0.05)
    started = time.monotonic()
    d = await node.consume("t:slow", PERIOD, LIMIT, resets_at())
    assert time.monotonic() - started < 0.5
    assert (d.allowed, d.used) == (True, 1)  # unseeded: counted from Redis's own state
    node._closed = True
