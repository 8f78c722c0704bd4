"""The single-node backends: GCRA all-or-nothing, replay cache, revocation bus."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.gcra import MemoryGcra
from portcullis.traffic.memory import MemoryRateBackend, MemoryReplayCache, MemoryRevocationBus
from portcullis.traffic.protocols import LimitCheck, RateBackend, ReplayCache, RevocationBus

TIGHT = RateLimitSpec(requests=2, per_seconds=60, burst=2)
LOOSE = RateLimitSpec(requests=100, per_seconds=60, burst=100)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_memory_backends_satisfy_the_contracts() -> None:
    rates: RateBackend = MemoryRateBackend()
    replay: ReplayCache = MemoryReplayCache()
    bus: RevocationBus = MemoryRevocationBus()
    assert None not in (rates, replay, bus)  # the check is mypy's: these assignments type-check


async def test_check_all_refusal_consumes_nothing() -> None:
    b = MemoryRateBackend(clock=Clock())
    both = [LimitCheck("loose", LOOSE), LimitCheck("tight", TIGHT)]
    assert all(d.allowed for d in await b.check_all(both))
    assert all(d.allowed for d in await b.check_all(both))
    for _ in range(5):  # tight refuses: loose must not advance
        d_loose, d_tight = await b.check_all(both)
        assert d_loose.allowed and not d_tight.allowed
        assert 29.9 < d_tight.retry_after <= 30.0
    (alone,) = await b.check_all([LimitCheck("loose", LOOSE)])
    assert alone.remaining == 97  # 100 - 2 admitted - this one; the five refusals took nothing


async def test_same_key_twice_in_one_call_counts_twice() -> None:
    b = MemoryRateBackend(clock=Clock())
    one = RateLimitSpec(1, 60, 1)
    first, second = await b.check_all([LimitCheck("k", one), LimitCheck("k", one)])
    assert first.allowed and not second.allowed
    # ...and, refused as a whole, the first did not consume either.
    (again,) = await b.check_all([LimitCheck("k", one)])
    assert again.allowed


async def test_cost_counts_several_requests() -> None:
    b = MemoryRateBackend(clock=Clock())
    (d,) = await b.check_all([LimitCheck("k", LOOSE, cost=60)])
    assert d.allowed and d.remaining == 40
    (d,) = await b.check_all([LimitCheck("k", LOOSE, cost=41)])
    assert not d.allowed and d.remaining == 40


async def test_refills_on_the_backend_clock() -> None:
    clock = Clock()
    b = MemoryRateBackend(clock=clock)
    c = [LimitCheck("k", TIGHT)]
    assert (await b.check_all(c))[0].allowed and (await b.check_all(c))[0].allowed
    assert not (await b.check_all(c))[0].allowed
    clock.t += 30
    assert (await b.check_all(c))[0].allowed


async def test_memory_is_bounded() -> None:
    clock = Clock()
    b = MemoryRateBackend(max_keys=50, clock=clock)
    for i in range(1000):
        await b.check_all([LimitCheck(f"k{i}", TIGHT), LimitCheck(f"j{i}", TIGHT)])
    assert len(b) <= 52


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 5), st.integers(1, 3)), max_size=80))
def test_single_checks_agree_with_the_reference_gcra(steps: list[tuple[str, float, int]]) -> None:
    """One check at a time, the backend is exactly `MemoryGcra`."""
    ref, b = MemoryGcra(), MemoryRateBackend()
    spec = RateLimitSpec(5, 10, 3)
    now = 0.0
    for key, dt, cost in steps:
        now += dt
        want = ref.check(key, spec, now, cost)
        (got,) = b.check_all_at([LimitCheck(key, spec, cost)], now)
        assert (got.allowed, got.remaining) == (want.allowed, want.remaining)
        assert abs(got.retry_after - want.retry_after) < 1e-9


async def test_replay_cache_first_use_then_replay_then_expiry() -> None:
    clock = Clock()
    c = MemoryReplayCache(clock=clock)
    assert await c.first_use("dpop", "jti-1", 60)
    assert not await c.first_use("dpop", "jti-1", 60)
    assert await c.first_use("sig", "jti-1", 60)  # namespaces are apart
    clock.t += 61
    assert await c.first_use("dpop", "jti-1", 60)


async def test_replay_cache_full_of_live_values_refuses_rather_than_forgets() -> None:
    clock = Clock()
    c = MemoryReplayCache(max_entries=3, clock=clock)
    for v in ("a", "b", "c"):
        assert await c.first_use("n", v, 60)
    assert not await c.first_use("n", "d", 60)  # fail closed: no eviction of live values
    assert not await c.first_use("n", "a", 60)  # and the old ones are still remembered
    clock.t += 61
    assert await c.first_use("n", "d", 60)  # expired ones make room
    assert len(c) == 1


async def test_replay_cache_heap_stays_bounded_under_churn() -> None:
    clock = Clock()
    c = MemoryReplayCache(max_entries=100, clock=clock)
    for i in range(10_000):
        clock.t += 0.01
        assert await c.first_use("n", str(i), 0.5)
    assert len(c) <= 100
    assert len(c._expiries) <= 200


async def test_revocation_bus_calls_every_listener_even_if_one_fails() -> None:
    bus = MemoryRevocationBus()
    calls: list[str] = []

    def sync_listener() -> None:
        calls.append("sync")

    async def async_listener() -> None:
        calls.append("async")

    def broken() -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(sync_listener)
    bus.subscribe(async_listener)
    await bus.publish()
    assert calls == ["sync", "async"]
    await bus.close()
    await bus.publish()
    assert calls == ["sync", "async"]
