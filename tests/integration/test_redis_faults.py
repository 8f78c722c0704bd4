"""Redis outages, for real: each test runs its own throwaway redis-server on a free
loopback port (no persistence), kills or freezes it mid-run, restarts it, and checks
the configured behaviour: fail-open falls back to local limits and alerts, fail-closed
refuses, the replay cache refuses while Redis is down, the revocation listener resumes,
and everything recovers without a restart of ours."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig, RedisFailureConfig
from portcullis.traffic.failover import OutageEvent, SharedTraffic
from portcullis.traffic.protocols import BackendUnavailable, LimitCheck
from portcullis.traffic.redis_backend import RedisBackends
from tests.integration.redis_harness import ThrowawayRedis

SPEC = RateLimitSpec(requests=10, per_seconds=60, burst=3)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    r = ThrowawayRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def traffic(server: ThrowawayRedis, limits: str) -> SharedTraffic:
    cfg = RedisConfig(url=server.url, connect_timeout_ms=50, timeout_ms=50, pool_timeout_ms=50,
                      on_failure=RedisFailureConfig.model_validate({"limits": limits, "probe_interval_ms": 100}))
    backends = RedisBackends.open(cfg)
    return SharedTraffic.wrap(backends, cfg.on_failure)


@pytest.fixture
async def open_traffic(server: ThrowawayRedis) -> AsyncIterator[SharedTraffic]:
    t = traffic(server, "open")
    yield t
    await t.close()


@pytest.fixture
async def closed_traffic(server: ThrowawayRedis) -> AsyncIterator[SharedTraffic]:
    t = traffic(server, "closed")
    yield t
    await t.close()


async def until(cond_async: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll an async predicate every 20 ms until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not await cond_async():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_fail_open_falls_back_to_local_limits_alerts_and_recovers(
        server: ThrowawayRedis, open_traffic: SharedTraffic, caplog: pytest.LogCaptureFixture) -> None:
    t = open_traffic
    events: list[OutageEvent] = []
    t.alerts.on_event(events.append)
    # Up: Redis decides, and its state is what counts.
    assert (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
    assert await t.backends.connection.client.exists("portcullis:rl:k") == 1

    server.stop()
    with caplog.at_level(logging.ERROR, logger="portcullis.traffic.failover"):
        t0 = time.perf_counter()
        got = [(await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed for _ in range(50)]
        elapsed = time.perf_counter() - t0
    # Local limits, not no limits: the burst of 3 then refusals.
    assert got[:3] == [True, True, True] and not any(got[3:])
    assert t.alerts.counters["limits.fallback"] == 50
    assert t.alerts.counters["limits.outages"] == 1 and "limits" in t.alerts.down
    assert [(e.concern, e.down) for e in events] == [("limits", True)]
    assert any("ALERT limits backend unavailable" in r.getMessage() for r in caplog.records)
    # The circuit keeps requests from each waiting out a timeout: 50 decisions, fast.
    assert elapsed < 1.0, elapsed

    server.start()  # the same port, empty (no persistence), scripts not loaded (NOSCRIPT)

    async def back() -> bool:
        await t.rates.check_all([LimitCheck("probe", SPEC)])
        return not t.rates.circuit.is_down

    await until(back)
    assert t.alerts.down == set()
    assert [(e.concern, e.down) for e in events] == [("limits", True), ("limits", False)]
    assert (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
    assert await t.backends.connection.client.exists("portcullis:rl:k") == 1  # Redis decides again


async def test_fail_closed_refuses_while_down_and_recovers(server: ThrowawayRedis,
                                                           closed_traffic: SharedTraffic) -> None:
    t = closed_traffic
    assert (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
    server.stop()
    for _ in range(10):
        with pytest.raises(BackendUnavailable):
            await t.rates.check_all([LimitCheck("k", SPEC)])
    with pytest.raises(BackendUnavailable):
        await t.quotas.consume("tenant", "2026-11-29", 100, time.time() + 60)
    assert t.alerts.counters["limits.refused"] == 10
    assert t.alerts.counters["quotas.refused"] == 1
    server.start()

    async def back() -> bool:
        try:
            return (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
        except BackendUnavailable:
            return False

    await until(back)


async def test_replay_cache_refuses_while_redis_is_down(server: ThrowawayRedis,
                                                       open_traffic: SharedTraffic) -> None:
    # Even with limits failing open, replay checks fail closed.
    t = open_traffic
    assert await t.replay.first_use("dpop", "jti-1", 60)
    server.stop()
    for value in ("jti-1", "jti-2"):
        with pytest.raises(BackendUnavailable):
            await t.replay.first_use("dpop", value, 60)
    assert t.alerts.counters["replay.refused"] == 2
    server.start()

    async def back() -> bool:
        try:
            return await t.replay.first_use("dpop", f"probe-{time.monotonic_ns()}", 60)
        except BackendUnavailable:
            return False

    await until(back)
    assert await t.replay.first_use("dpop", "jti-3", 60)
    assert not await t.replay.first_use("dpop", "jti-3", 60)


async def test_frozen_redis_times_out_within_the_budget(server: ThrowawayRedis,
                                                       closed_traffic: SharedTraffic) -> None:
    t = closed_traffic
    assert (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
    server.freeze()  # connections stay open, nothing answers: the slow-Redis case
    try:
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match=r"timed out|Timeout"):
            await t.backends.rates.check_all([LimitCheck("k", SPEC)])
        assert time.perf_counter() - t0 < t.backends.connection.deadline + 0.5
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable):
            await t.replay.first_use("dpop", "x", 60)
        assert time.perf_counter() - t0 < t.backends.connection.deadline + 0.5
    finally:
        server.thaw()


async def test_revocation_listener_resumes_after_a_restart(server: ThrowawayRedis) -> None:
    cfg = RedisConfig(url=server.url, connect_timeout_ms=50, timeout_ms=50, pool_timeout_ms=50)
    node_a, node_b = RedisBackends.open(cfg), RedisBackends.open(cfg)
    try:
        calls = 0
        got = asyncio.Event()

        def listener() -> None:
            nonlocal calls
            calls += 1
            got.set()

        node_b.revocations.subscribe(listener)
        async with asyncio.timeout(2):
            await node_b.revocations.wait_ready()
        await node_a.revocations.publish()
        async with asyncio.timeout(1):
            await got.wait()

        server.stop()
        got.clear()

        async def lost() -> bool:
            return not node_b.revocations.connected

        await until(lost)
        with pytest.raises(BackendUnavailable):
            await node_a.revocations.publish()
        server.start()
        async with asyncio.timeout(5):
            await node_b.revocations.wait_ready()
        # After a reconnect the listener is told once: it may have missed messages.
        async with asyncio.timeout(1):
            await got.wait()
        assert node_b.revocations.reconnects >= 1
        got.clear()
        before = node_b.revocations.received
        t0 = time.perf_counter()
        await node_a.revocations.publish()
        async with asyncio.timeout(1):
            await got.wait()
        assert time.perf_counter() - t0 < 1.0
        assert node_b.revocations.received == before + 1
    finally:
        await node_a.close()
        await node_b.close()


async def test_scripts_reload_after_script_flush(server: ThrowawayRedis, closed_traffic: SharedTraffic) -> None:
    t = closed_traffic
    assert (await t.rates.check_all([LimitCheck("k", SPEC)]))[0].allowed
    assert (await t.quotas.consume("q", "2026-11", 5, time.time() + 60)).allowed
    await t.backends.connection.client.script_flush()
    d = await t.rates.check_all([LimitCheck("k", SPEC)])  # NOSCRIPT, loaded, answered
    assert d[0].allowed and d[0].remaining == 1
    assert (await t.quotas.consume("q", "2026-11", 5, time.time() + 60)).used == 2


async def test_quota_key_expires_when_the_period_ends(server: ThrowawayRedis,
                                                     closed_traffic: SharedTraffic) -> None:
    t = closed_traffic
    client = t.backends.connection.client
    ends = time.time() + 3600
    await t.quotas.consume("tenant", "2026-11-29", 5, ends)
    pttl = await client.pttl("portcullis:q:2026-11-29:tenant")
    assert 3590_000 < pttl <= 3600_000
    # A period end already past by Redis's clock (a node's clock behind): kept a minute,
    # not deleted at once (which would forget every count).
    await t.quotas.consume("tenant", "2026-11-28", 5, time.time() - 5)
    d = await t.quotas.consume("tenant", "2026-11-28", 5, time.time() - 5)
    assert d.used == 2
    pttl = await client.pttl("portcullis:q:2026-11-28:tenant")
    assert 50_000 < pttl <= 60_000


async def test_rate_keys_expire_when_the_bucket_is_full_again(server: ThrowawayRedis,
                                                             closed_traffic: SharedTraffic) -> None:
    t = closed_traffic
    await t.rates.check_all([LimitCheck("k", SPEC)])
    pttl = await t.backends.connection.client.pttl("portcullis:rl:k")
    assert 5_900 < pttl <= 6_000  # one interval of 6 s used
