"""One contract suite for every traffic backend (DESIGN.md, "limits"): the same tests
run against the in-process backends and against Redis (the shared server, database 15,
a fresh key prefix per test). Redis cases skip, saying why, when the server is absent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.failover import LocalQuota
from portcullis.traffic.memory import MemoryRateBackend, MemoryReplayCache, MemoryRevocationBus
from portcullis.traffic.protocols import (
    LimitCheck,
    QuotaBackend,
    RateBackend,
    ReplayCache,
    RevocationBus,
)
from portcullis.traffic.quota import SqliteQuotaBackend
from portcullis.traffic.redis_backend import (
    RedisConnection,
    RedisQuota,
    RedisRateBackend,
    RedisReplayCache,
    RedisRevocationBus,
)
from tests.integration.redis_harness import shared_redis_url, unique_prefix

REDIS = pytest.param("redis", marks=pytest.mark.services)


@dataclass
class Nodes:
    """Makes backends of one kind; for Redis each call is another node (its own pool)."""

    kind: str
    tmp: Path
    prefix: str = field(default_factory=unique_prefix)
    conns: list[RedisConnection] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def conn(self) -> RedisConnection:
        cfg = RedisConfig(url=shared_redis_url(), key_prefix=self.prefix, timeout_ms=2000,
                          connect_timeout_ms=2000, pool_timeout_ms=2000)
        c = RedisConnection(cfg)
        self.conns.append(c)
        return c

    def rates(self) -> RateBackend:
        b: RateBackend = MemoryRateBackend() if self.kind == "memory" else RedisRateBackend(self.conn())
        self.closers.append(b.close)
        return b

    def quotas(self) -> QuotaBackend:
        b: QuotaBackend
        if self.kind == "memory":
            b = LocalQuota()
        elif self.kind == "sqlite":
            b = SqliteQuotaBackend(self.tmp / "quota.db")
        else:
            b = RedisQuota(self.conn())
        self.closers.append(b.close)
        return b

    def replay(self) -> ReplayCache:
        b: ReplayCache = MemoryReplayCache() if self.kind == "memory" else RedisReplayCache(self.conn())
        self.closers.append(b.close)
        return b

    def bus(self) -> RevocationBus:
        b: RevocationBus = MemoryRevocationBus() if self.kind == "memory" else RedisRevocationBus(self.conn())
        self.closers.append(b.close)
        return b

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()
        if self.conns:
            # Leave nothing behind on the shared server.
            c = self.conns[0]
            keys = [k async for k in c.client.scan_iter(match=self.prefix + "*", count=1000)]
            if keys:
                await c.client.delete(*keys)
        for c in self.conns:
            await c.close()


@pytest.fixture(params=["memory", REDIS])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(request.param, tmp_path)
    yield n
    await n.close()


@pytest.fixture(params=["memory", "sqlite", REDIS])
async def quota_nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(request.param, tmp_path)
    yield n
    await n.close()


async def ready(bus: RevocationBus) -> None:
    if isinstance(bus, RedisRevocationBus):
        async with asyncio.timeout(2):
            await bus.wait_ready()


SLOW = RateLimitSpec(requests=10, per_seconds=60, burst=3)  # one every 6 s, 3 at once
ROOMY = RateLimitSpec(requests=1000, per_seconds=60, burst=100)

# -- RateBackend ---------------------------------------------------------------------


async def test_burst_then_refused_with_retry_after(nodes: Nodes) -> None:
    rates = nodes.rates()
    got = [(await rates.check_all([LimitCheck("k", SLOW)]))[0] for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got[:3]] == [2, 1, 0]
    assert got[3].remaining == 0
    # The next request fits when one interval (6 s) has drained.
    assert 5.9 <= got[3].retry_after <= 6.0
    assert 17.9 <= got[3].reset_after <= 18.0
    assert all(d.retry_after == 0 for d in got[:3])


async def test_all_or_nothing_refusal_changes_no_key(nodes: Nodes) -> None:
    rates = nodes.rates()
    for _ in range(3):
        assert (await rates.check_all([LimitCheck("full", SLOW)]))[0].allowed
    # 'roomy' would admit, 'full' refuses: the request is refused and 'roomy' untouched.
    for _ in range(5):
        d = await rates.check_all([LimitCheck("roomy", SLOW), LimitCheck("full", SLOW)])
        assert [x.allowed for x in d] == [True, False]
    solo = [(await rates.check_all([LimitCheck("roomy", SLOW)]))[0] for _ in range(4)]
    assert [d.allowed for d in solo] == [True, True, True, False]


async def test_keys_are_independent_and_decisions_in_order(nodes: Nodes) -> None:
    rates = nodes.rates()
    for _ in range(3):
        await rates.check_all([LimitCheck("a", SLOW)])
    d = await rates.check_all([LimitCheck("b", SLOW), LimitCheck("c", ROOMY)])
    assert [(x.allowed, x.remaining) for x in d] == [(True, 2), (True, 99)]
    d = await rates.check_all([LimitCheck("c", ROOMY), LimitCheck("a", SLOW)])
    assert [x.allowed for x in d] == [True, False]
    assert await rates.check_all([]) == []


async def test_same_key_twice_in_one_request_counts_twice(nodes: Nodes) -> None:
    rates = nodes.rates()
    d = await rates.check_all([LimitCheck("k", SLOW), LimitCheck("k", SLOW)])
    assert [(x.allowed, x.remaining) for x in d] == [(True, 2), (True, 1)]
    # Two more do not fit in the one left: refused, and the one left is still there.
    d = await rates.check_all([LimitCheck("k", SLOW), LimitCheck("k", SLOW)])
    assert [x.allowed for x in d] == [True, False]
    assert (await rates.check_all([LimitCheck("k", SLOW)]))[0].allowed


async def test_cost(nodes: Nodes) -> None:
    rates = nodes.rates()
    assert not (await rates.check_all([LimitCheck("k", SLOW, cost=4)]))[0].allowed
    d = (await rates.check_all([LimitCheck("k", SLOW, cost=3)]))[0]
    assert d.allowed and d.remaining == 0
    assert not (await rates.check_all([LimitCheck("k", SLOW)]))[0].allowed


async def test_refills_at_the_rate(nodes: Nodes) -> None:
    rates = nodes.rates()
    fast = RateLimitSpec(requests=20, per_seconds=1, burst=1)  # one every 50 ms
    assert (await rates.check_all([LimitCheck("k", fast)]))[0].allowed
    refused = (await rates.check_all([LimitCheck("k", fast)]))[0]
    assert not refused.allowed and 0 < refused.retry_after <= 0.05
    await asyncio.sleep(refused.retry_after + 0.01)
    assert (await rates.check_all([LimitCheck("k", fast)]))[0].allowed


async def test_concurrent_callers_get_exactly_the_burst(nodes: Nodes) -> None:
    rates = nodes.rates()
    spec = RateLimitSpec(requests=1, per_seconds=3600, burst=10)
    results = await asyncio.gather(*(rates.check_all([LimitCheck("hot", spec), LimitCheck(f"own{i}", ROOMY)])
                                     for i in range(60)))
    assert sum(r[0].allowed for r in results) == 10


async def test_nodes_share_one_limit(nodes: Nodes) -> None:
    if nodes.kind == "memory":
        pytest.skip("the memory backend is one node by definition")
    a, b = nodes.rates(), nodes.rates()
    got = [(await (a if i % 2 else b).check_all([LimitCheck("k", SLOW)]))[0].allowed for i in range(6)]
    assert got == [True, True, True, False, False, False]


# -- QuotaBackend --------------------------------------------------------------------


async def test_quota_counts_to_the_limit(quota_nodes: Nodes) -> None:
    q = quota_nodes.quotas()
    ends = time.time() + 3600
    got = [await q.consume("t", "2026-11-29", 3, ends) for _ in range(4)]
    assert [(d.allowed, d.used) for d in got] == [(True, 1), (True, 2), (True, 3), (False, 3)]
    assert all(d.limit == 3 and d.resets_at == ends for d in got)


async def test_quota_cost_over_the_rest_is_refused_and_not_counted(quota_nodes: Nodes) -> None:
    q = quota_nodes.quotas()
    ends = time.time() + 3600
    assert (await q.consume("t", "2026-11", 10, ends, cost=7)).used == 7
    d = await q.consume("t", "2026-11", 10, ends, cost=4)
    assert not d.allowed and d.used == 7
    d = await q.consume("t", "2026-11", 10, ends, cost=3)
    assert d.allowed and d.used == 10


async def test_quota_refund_never_below_zero(quota_nodes: Nodes) -> None:
    q = quota_nodes.quotas()
    ends = time.time() + 3600
    await q.consume("t", "2026-11-29", 5, ends, cost=2)
    assert (await q.consume("t", "2026-11-29", 5, ends, cost=-1)).used == 1
    assert (await q.consume("t", "2026-11-29", 5, ends, cost=-5)).used == 0
    assert (await q.consume("t", "2026-11-29", 5, ends, cost=5)).allowed


async def test_quota_periods_and_keys_are_independent(quota_nodes: Nodes) -> None:
    q = quota_nodes.quotas()
    ends = time.time() + 3600
    assert (await q.consume("t", "2026-11-29", 1, ends)).allowed
    assert not (await q.consume("t", "2026-11-29", 1, ends)).allowed
    assert (await q.consume("t", "2026-11-30", 1, ends)).allowed
    assert (await q.consume("u", "2026-11-29", 1, ends)).allowed


async def test_quota_survives_a_restart(quota_nodes: Nodes) -> None:
    if quota_nodes.kind == "memory":
        pytest.skip("the in-memory fallback quota is for outages only and forgets on restart by design")
    ends = time.time() + 3600
    first = quota_nodes.quotas()
    await first.consume("t", "2026-11", 5, ends, cost=4)
    await first.close()
    quota_nodes.closers.remove(first.close)
    again = quota_nodes.quotas()
    d = await again.consume("t", "2026-11", 5, ends, cost=2)
    assert not d.allowed and d.used == 4


# -- ReplayCache ---------------------------------------------------------------------


async def test_replay_first_use_then_replay(nodes: Nodes) -> None:
    cache = nodes.replay()
    assert await cache.first_use("dpop", "jti-1", 60)
    assert not await cache.first_use("dpop", "jti-1", 60)
    assert await cache.first_use("dpop", "jti-2", 60)
    assert await cache.first_use("sig", "jti-1", 60)  # namespaces are apart


async def test_replay_forgets_after_ttl(nodes: Nodes) -> None:
    cache = nodes.replay()
    assert await cache.first_use("dpop", "short", 0.05)
    assert not await cache.first_use("dpop", "short", 0.05)
    await asyncio.sleep(0.12)
    assert await cache.first_use("dpop", "short", 0.05)


async def test_replay_race_has_one_winner(nodes: Nodes) -> None:
    caches = [nodes.replay() for _ in range(3 if nodes.kind == "redis" else 1)]
    wins = await asyncio.gather(*(caches[i % len(caches)].first_use("dpop", "raced", 60) for i in range(30)))
    assert sum(wins) == 1


async def test_replay_long_and_odd_values(nodes: Nodes) -> None:
    cache = nodes.replay()
    odd = "ä\x00:*?" + "x" * 10_000
    assert await cache.first_use("dpop", odd, 60)
    assert not await cache.first_use("dpop", odd, 60)
    assert await cache.first_use("dpop", odd[:-1], 60)


# -- RevocationBus -------------------------------------------------------------------


async def test_bus_calls_every_listener_including_the_publishers(nodes: Nodes) -> None:
    bus = nodes.bus()
    calls: list[str] = []
    done = asyncio.Event()

    def broken() -> None:
        raise RuntimeError("listener bug")

    async def async_listener() -> None:
        calls.append("async")
        done.set()

    bus.subscribe(lambda: calls.append("sync"))
    bus.subscribe(broken)
    bus.subscribe(async_listener)
    await ready(bus)
    await bus.publish()
    async with asyncio.timeout(2):
        await done.wait()
    assert calls == ["sync", "async"]


async def test_bus_fans_out_to_another_node_within_a_second(nodes: Nodes) -> None:
    if nodes.kind == "memory":
        pytest.skip("the memory bus is one process by definition")
    sender, receiver = nodes.bus(), nodes.bus()
    got = asyncio.Event()
    receiver.subscribe(got.set)
    sender.subscribe(lambda: None)
    await ready(receiver)
    latencies = []
    for _ in range(5):
        got.clear()
        t0 = time.perf_counter()
        await sender.publish()
        async with asyncio.timeout(1):
            await got.wait()
        latencies.append(time.perf_counter() - t0)
    assert max(latencies) < 1.0, latencies


# -- Redis specifics: batching of concurrent calls into one script call ---------------


@pytest.mark.services
@pytest.mark.parametrize(("max_batch", "max_inflight"), [(1, 4), (7, 4), (7, 1), (128, 4)])
async def test_batched_calls_decide_as_if_alone(tmp_path: Path, max_batch: int, max_inflight: int) -> None:
    n = Nodes("redis", tmp_path)
    try:
        rates = RedisRateBackend(n.conn(), max_batch=max_batch, max_inflight=max_inflight)
        n.closers.append(rates.close)
        spec = RateLimitSpec(requests=1, per_seconds=3600, burst=10)
        # Odd requests carry a key that is already exhausted: refused, and they must not
        # take any of 'hot' with them even when they share a script call with the rest.
        for _ in range(3):
            await rates.check_all([LimitCheck("full", SLOW)])
        calls = [rates.check_all([LimitCheck("hot", spec)] + ([LimitCheck("full", SLOW)] if i % 2 else []))
                 for i in range(60)]
        results = await asyncio.gather(*calls)
        # Calls made while `max_inflight` batches are out wait for one to finish.
        more = await asyncio.gather(*(rates.check_all([LimitCheck(f"x{i}", SLOW)]) for i in range(50)))
        assert all(r[0].allowed for r in more)
        assert sum(all(d.allowed for d in r) for r in results) == 10
        assert all(not r[1].allowed for r in results[1::2])
        winners = [i for i, r in enumerate(results) if all(d.allowed for d in r)]
        assert all(i % 2 == 0 for i in winners)
        if max_batch >= 60:  # one script call: decided in arrival order, the first ten even ones win
            assert winners == list(range(0, 20, 2))
    finally:
        await n.close()


@pytest.mark.services
async def test_a_cancelled_caller_does_not_disturb_its_batch(tmp_path: Path) -> None:
    n = Nodes("redis", tmp_path)
    try:
        rates = RedisRateBackend(n.conn())
        n.closers.append(rates.close)
        tasks = [asyncio.ensure_future(rates.check_all([LimitCheck(f"k{i}", SLOW)])) for i in range(10)]
        await asyncio.sleep(0)  # queued, not yet answered
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert all(isinstance(d, list) and d[0].allowed for i, d in enumerate(done) if i != 3)
    finally:
        await n.close()


@pytest.mark.services
async def test_many_keys_in_one_request_and_bad_input(tmp_path: Path) -> None:
    n = Nodes("redis", tmp_path)
    try:
        rates = RedisRateBackend(n.conn())
        n.closers.append(rates.close)
        many = [LimitCheck(f"k{i}", SLOW) for i in range(100)]
        assert all(d.allowed for d in await rates.check_all(many))
        with pytest.raises(ValueError, match="at most 100"):
            await rates.check_all([*many, LimitCheck("one-too-many", SLOW)])
        with pytest.raises(ValueError, match="cost"):
            await rates.check_all([LimitCheck("k", SLOW, cost=-1)])  # a negative cost would be a refund
        replay = RedisReplayCache(n.conn())
        with pytest.raises(ValueError, match="namespace"):
            await replay.first_use("bad:ns", "v", 60)
        quota = RedisQuota(n.conn())
        with pytest.raises(ValueError, match="period"):
            await quota.consume("k", "2026:11", 5, time.time() + 60)
    finally:
        await n.close()
