"""Failure behaviour per concern (traffic/failover.py), with a controllable clock.

The shared backend here is `Flaky`, a tiny implementation of our own protocols that
can be switched down (it raises `BackendUnavailable`, as every Redis backend does on a
failure); the real Redis outages are in tests/integration/test_redis_faults.py. The
last tests point the real Redis backends at a port where nothing listens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytest

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.failover import (
    FailClosedReplayCache,
    FailoverAlerts,
    FailoverQuota,
    FailoverRateBackend,
    FailoverRevocationBus,
    LocalQuota,
    OutageEvent,
)
from portcullis.traffic.gcra import Decision
from portcullis.traffic.memory import MemoryRateBackend, MemoryReplayCache, MemoryRevocationBus
from portcullis.traffic.protocols import BackendUnavailable, LimitCheck, QuotaDecision, RevocationListener
from portcullis.traffic.redis_backend import (
    RedisConnection,
    RedisQuota,
    RedisRateBackend,
    RedisReplayCache,
    RedisRevocationBus,
)
from tests.integration.harness import free_port

SPEC = RateLimitSpec(requests=10, per_seconds=60, burst=4)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Flaky:
    """Shared backends of every kind that are up (delegating to memory) or down."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self._rates = MemoryRateBackend()
        self._quota = LocalQuota()
        self._replay = MemoryReplayCache()
        self._bus = MemoryRevocationBus()

    def _hit(self) -> None:
        self.calls += 1
        if self.down:
            raise BackendUnavailable("redis rate check: ConnectionError: refused")

    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        self._hit()
        return await self._rates.check_all(checks)

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        self._hit()
        return await self._quota.consume(key, period, limit, resets_at, cost)

    async def first_use(self, namespace: str, value: str, ttl_seconds: float) -> bool:
        self._hit()
        return await self._replay.first_use(namespace, value, ttl_seconds)

    def subscribe(self, listener: RevocationListener) -> None:
        self._bus.subscribe(listener)

    async def publish(self) -> None:
        self._hit()
        await self._bus.publish()

    async def close(self) -> None:
        return None


def allowed(ds: list[Decision]) -> bool:
    return all(d.allowed for d in ds)


async def test_fail_closed_refuses_and_counts() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    rates = FailoverRateBackend(shared, mode="closed", alerts=alerts, clock=clock)
    assert allowed(await rates.check_all([LimitCheck("k", SPEC)]))
    shared.down = True
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await rates.check_all([LimitCheck("k", SPEC)])
    assert alerts.counters["limits.refused"] == 3
    assert alerts.counters["limits.outages"] == 1
    assert alerts.down == {"limits"}


async def test_fail_open_enforces_local_limits_and_alerts_once(caplog: pytest.LogCaptureFixture) -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    events: list[OutageEvent] = []
    alerts.on_event(events.append)
    local = MemoryRateBackend(clock=clock)
    rates = FailoverRateBackend(shared, mode="open", alerts=alerts, local=local, clock=clock)
    shared.down = True
    with caplog.at_level(logging.ERROR, logger="portcullis.traffic.failover"):
        got = [allowed(await rates.check_all([LimitCheck("k", SPEC)])) for _ in range(6)]
    # Fail-open is not "no limit": the node enforces the limit itself.
    assert got == [True, True, True, True, False, False]
    assert alerts.counters["limits.fallback"] == 6
    assert alerts.counters["limits.outages"] == 1
    assert [(e.concern, e.down) for e in events] == [("limits", True)]
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "limits backend unavailable" in caplog.records[0].getMessage()


async def test_fail_open_divides_each_limit_between_the_nodes() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    shared.down = True
    rates = FailoverRateBackend(shared, mode="open", alerts=alerts, nodes=2, local=MemoryRateBackend(clock=clock),
                                clock=clock)
    got = [allowed(await rates.check_all([LimitCheck("k", SPEC)])) for _ in range(4)]
    assert got == [True, True, False, False]  # burst 4 shared by 2 nodes: 2 here


async def test_circuit_skips_the_backend_until_the_probe_then_recovers() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    events: list[OutageEvent] = []
    alerts.on_event(events.append)
    rates = FailoverRateBackend(shared, mode="open", alerts=alerts, probe_interval=1.0,
                                local=MemoryRateBackend(clock=clock), clock=clock)
    shared.down = True
    await rates.check_all([LimitCheck("k", SPEC)])
    assert shared.calls == 1
    for _ in range(20):  # within the probe interval: no request waits on the dead backend
        await rates.check_all([LimitCheck("k", SPEC)])
    assert shared.calls == 1
    clock.t += 1.01
    await rates.check_all([LimitCheck("k", SPEC)])  # the probe: still down
    assert shared.calls == 2
    await rates.check_all([LimitCheck("k", SPEC)])
    assert shared.calls == 2
    shared.down = False
    clock.t += 1.01
    assert allowed(await rates.check_all([LimitCheck("k", SPEC)]))  # the probe succeeds
    assert shared.calls == 3
    assert not rates.circuit.is_down and alerts.down == set()
    assert [(e.concern, e.down) for e in events] == [("limits", True), ("limits", False)]
    await rates.check_all([LimitCheck("k", SPEC)])
    assert shared.calls == 4  # back on the shared backend for every request


async def test_quota_follows_the_limits_setting() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    closed = FailoverQuota(shared, mode="closed", alerts=alerts, clock=clock)
    opened = FailoverQuota(shared, mode="open", alerts=alerts, nodes=2, clock=clock)
    shared.down = True
    ends = time.time() + 60
    with pytest.raises(BackendUnavailable):
        await closed.consume("t", "2026-11-29", 10, ends)
    got = [(await opened.consume("t", "2026-11-29", 10, ends)) for _ in range(6)]
    assert [d.allowed for d in got] == [True] * 5 + [False]  # 10 shared by 2 nodes
    assert got[0].limit == 10  # the configured limit is what the headers show
    assert alerts.counters["quotas.refused"] == 1 and alerts.counters["quotas.fallback"] == 6


async def test_replay_cache_never_fails_open() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()
    cache = FailClosedReplayCache(shared, alerts=alerts, clock=clock)
    assert await cache.first_use("dpop", "a", 60)
    shared.down = True
    for value in ("b", "c", "a"):  # fresh or replayed: nothing can be vouched for
        with pytest.raises(BackendUnavailable):
            await cache.first_use("dpop", value, 60)
    assert alerts.counters["replay.refused"] == 3
    shared.down = False
    clock.t += 2
    assert await cache.first_use("dpop", "b", 60)
    assert not await cache.first_use("dpop", "a", 60)


async def test_revocation_publish_failure_still_tells_this_node() -> None:
    shared, alerts = Flaky(), FailoverAlerts()
    bus = FailoverRevocationBus(shared, alerts=alerts)
    calls: list[int] = []
    bus.subscribe(lambda: calls.append(1))
    await bus.publish()
    assert calls == [1]
    shared.down = True
    await bus.publish()  # does not raise: the store stays the truth for other nodes
    assert calls == [1, 1]
    assert alerts.counters["revocations.publish_failed"] == 1
    assert alerts.down == {"revocations"}
    shared.down = False
    await bus.publish()
    assert alerts.down == set()


async def test_local_quota_bounds_its_memory() -> None:
    q = LocalQuota(max_keys=3, clock=lambda: 100.0)
    for i in range(10):
        assert (await q.consume(f"k{i}", "p", 5, 200.0)).allowed
    assert len(q._used) <= 3


async def test_alert_callback_that_raises_does_not_break_the_request() -> None:
    shared, alerts, clock = Flaky(), FailoverAlerts(), Clock()

    def bad(event: OutageEvent) -> None:
        raise RuntimeError("webhook down")

    alerts.on_event(bad)
    rates = FailoverRateBackend(shared, mode="open", alerts=alerts, clock=clock)
    shared.down = True
    assert allowed(await rates.check_all([LimitCheck("k", SPEC)]))


# -- the real Redis backends against a port where nothing listens ---------------------


async def test_unreachable_redis_is_backend_unavailable_within_the_budget() -> None:
    cfg = RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_ms=50, timeout_ms=50,
                      pool_timeout_ms=50)
    conn = RedisConnection(cfg)
    try:
        calls = [
            RedisRateBackend(conn).check_all([LimitCheck("k", SPEC)]),
            RedisQuota(conn).consume("k", "2026-11", 5, time.time() + 60),
            RedisReplayCache(conn).first_use("dpop", "v", 60),
            RedisRevocationBus(conn).publish(),
        ]
        for call in calls:
            t0 = time.perf_counter()
            with pytest.raises(BackendUnavailable) as info:
                await call
            assert time.perf_counter() - t0 < conn.deadline + 0.5
            assert "127.0.0.1" in str(info.value)
    finally:
        await conn.close()


async def test_backend_unavailable_message_hides_the_password() -> None:
    cfg = RedisConfig(url=f"redis://user:hunter2@127.0.0.1:{free_port()}/0")
    conn = RedisConnection(cfg)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await RedisReplayCache(conn).first_use("dpop", "v", 60)
        assert "hunter2" not in str(info.value)
    finally:
        await conn.close()


def test_password_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PC_TEST_REDIS_PW", raising=False)
    with pytest.raises(ValueError, match="PC_TEST_REDIS_PW is not set"):
        RedisConnection.from_config(RedisConfig(password_env="PC_TEST_REDIS_PW"))
