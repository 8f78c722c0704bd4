"""Concurrency limits per upstream and tenant; the gradient controller."""

from __future__ import annotations

from portcullis.traffic.concurrency import (
    AdaptiveConcurrencyConfig,
    ConcurrencyConfig,
    ConcurrencyLimiter,
    GradientController,
    Shed,
    Slot,
    UpstreamConcurrencyConfig,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def limiter(**kw: object) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(ConcurrencyConfig.model_validate(kw))


def test_upstream_limit_and_release() -> None:
    lim = limiter(upstreams={"u": {"max_concurrency": 2}})
    a, b = lim.acquire("u", None), lim.acquire("u", None)
    assert isinstance(a, Slot) and isinstance(b, Slot)
    shed = lim.acquire("u", None)
    assert isinstance(shed, Shed) and shed.limit == "upstream" and shed.retry_after == 1
    assert isinstance(lim.acquire("other", None), Slot)  # unlimited upstream
    lim.release(a)
    lim.release(a)  # idempotent: must not free a second slot
    assert isinstance(lim.acquire("u", None), Slot)
    assert isinstance(lim.acquire("u", None), Shed)


def test_tenant_share_keeps_room_for_other_tenants() -> None:
    lim = limiter(upstreams={"u": {"max_concurrency": 10, "tenant_share": 0.4}})
    noisy = [lim.acquire("u", "noisy") for _ in range(10)]
    assert sum(isinstance(s, Slot) for s in noisy) == 4
    assert {s.limit for s in noisy if isinstance(s, Shed)} == {"tenant_share"}
    quiet = [lim.acquire("u", "quiet") for _ in range(4)]
    assert all(isinstance(s, Slot) for s in quiet)
    assert lim.in_flight["u"] == 8


def test_per_tenant_cap_across_upstreams_and_overrides() -> None:
    lim = limiter(per_tenant=2, tenants={"big": 3})
    assert isinstance(lim.acquire("u1", "t"), Slot)
    assert isinstance(lim.acquire("u2", "t"), Slot)
    shed = lim.acquire("u3", "t")
    assert isinstance(shed, Shed) and shed.limit == "tenant"
    assert sum(isinstance(lim.acquire("u1", "big"), Slot) for _ in range(5)) == 3


def test_refusal_by_one_limit_holds_no_slot_of_another() -> None:
    lim = limiter(upstreams={"u": {"max_concurrency": 5}}, per_tenant=1)
    assert isinstance(lim.acquire("u", "t"), Slot)
    assert isinstance(lim.acquire("u", "t"), Shed)  # tenant cap
    assert lim.in_flight["u"] == 1  # the upstream count did not move


def test_release_returns_every_count_to_zero() -> None:
    lim = limiter(upstreams={"u": {"max_concurrency": 50, "tenant_share": 0.5}}, per_tenant=20)
    slots = [s for s in (lim.acquire("u", f"t{i % 3}") for i in range(60)) if isinstance(s, Slot)]
    for s in slots:
        lim.release(s)
    assert lim.in_flight == {} and lim.tenant_in_flight("t0") == 0


ADAPTIVE = AdaptiveConcurrencyConfig(sample_window_seconds=1, min_rtt_window_seconds=1000, min_limit=2)


def run_window(c: GradientController, clock: Clock, latency: float, n: int = 20) -> None:
    for _ in range(n):
        c.record(latency)
    clock.t += 1.01
    c.record(latency)  # closes the window


def test_gradient_shrinks_when_latency_rises_and_recovers_when_it_falls() -> None:
    clock = Clock()
    c = GradientController(ADAPTIVE, max_limit=100, clock=clock)
    for _ in range(3):
        run_window(c, clock, 0.010)
    assert c.current == 100 and c.min_rtt is not None and abs(c.min_rtt - 0.010) < 1e-9
    limits = []
    for _ in range(6):
        run_window(c, clock, 0.200)
        limits.append(c.current)
    assert limits == sorted(limits, reverse=True)
    assert limits[0] <= 60  # halves (plus headroom) on the first slow window
    assert limits[-1] <= 10  # converging on the floor where 0.5 L + sqrt(0.5 L) = L
    for _ in range(12):
        run_window(c, clock, 0.010)
    assert c.current == 100


def test_gradient_holds_steady_at_baseline_latency() -> None:
    clock = Clock()
    c = GradientController(ADAPTIVE, max_limit=40, clock=clock)
    for _ in range(10):
        run_window(c, clock, 0.05)
    assert c.current == 40


def test_min_rtt_window_lets_a_new_baseline_form() -> None:
    clock = Clock()
    cfg = AdaptiveConcurrencyConfig(sample_window_seconds=1, min_rtt_window_seconds=5, min_limit=1)
    c = GradientController(cfg, max_limit=50, clock=clock)
    run_window(c, clock, 0.01)
    for _ in range(10):  # permanently slower: after the window, it is the new normal
        run_window(c, clock, 0.1)
    assert c.min_rtt is not None and abs(c.min_rtt - 0.1) < 1e-9
    assert c.current == 50


def test_adaptive_limit_sheds_and_retry_after_follows_latency() -> None:
    clock = Clock()
    lim = ConcurrencyLimiter(ConcurrencyConfig(upstreams={"u": UpstreamConcurrencyConfig(
        max_concurrency=20, adaptive=ADAPTIVE)}), clock=clock)
    ctl = lim.controllers["u"]
    for _ in range(3):
        run_window(ctl, clock, 0.01)
    for _ in range(6):
        run_window(ctl, clock, 2.5)
    cap = lim.limit_of("u")
    assert cap is not None and cap < 20
    held = [lim.acquire("u", None) for _ in range(cap)]
    assert all(isinstance(s, Slot) for s in held)
    shed = lim.acquire("u", None)
    assert isinstance(shed, Shed) and shed.retry_after == 3  # ceil(sampleRTT)
