"""GCRA limiter: burst, sustained rate, retry-after, bounded memory."""

from __future__ import annotations

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.gcra import MemoryGcra

SPEC = RateLimitSpec(requests=60, per_seconds=60, burst=10)


def test_burst_then_refusal() -> None:
    g = MemoryGcra()
    results = [g.check("k", SPEC, 100.0) for _ in range(11)]
    assert all(r.allowed for r in results[:10])
    assert not results[10].allowed
    assert results[9].remaining == 0
    assert results[0].remaining == 9
    # One request per second comes back.
    assert 0.99 < results[10].retry_after <= 1.0


def test_sustained_rate_admits_exactly_the_rate() -> None:
    g = MemoryGcra()
    spec = RateLimitSpec(requests=10, per_seconds=1, burst=1)
    now = 0.0
    allowed = 0
    for i in range(1000):  # 100 requests per second for 10 simulated seconds
        now = i * 0.01
        allowed += g.check("k", spec, now).allowed
    assert 99 <= allowed <= 101


def test_refusal_does_not_consume() -> None:
    g = MemoryGcra()
    spec = RateLimitSpec(requests=1, per_seconds=10, burst=1)
    assert g.check("k", spec, 0.0).allowed
    for _ in range(50):
        assert not g.check("k", spec, 1.0).allowed
    assert g.check("k", spec, 10.0).allowed


def test_keys_are_independent() -> None:
    g = MemoryGcra()
    spec = RateLimitSpec(requests=1, per_seconds=60, burst=1)
    assert g.check("a", spec, 0.0).allowed
    assert g.check("b", spec, 0.0).allowed
    assert not g.check("a", spec, 0.0).allowed


def test_memory_is_bounded() -> None:
    g = MemoryGcra(max_keys=100)
    spec = RateLimitSpec(requests=1, per_seconds=1000, burst=5)
    for i in range(1000):
        g.check(f"k{i}", spec, float(i) * 0.0001)
    assert len(g) <= 100


def test_sweep_prefers_full_buckets() -> None:
    g = MemoryGcra(max_keys=10)
    spec = RateLimitSpec(requests=1, per_seconds=1, burst=1)
    for i in range(10):
        g.check(f"old{i}", spec, 0.0)
    # At t=100 every old bucket is full again, so they are swept first.
    g.check("new", spec, 100.0)
    assert len(g) == 1


def test_refund_gives_back_exactly_one_request() -> None:
    g = MemoryGcra()
    spec = RateLimitSpec(requests=2, per_seconds=60, burst=2)
    assert g.check("k", spec, 0.0).allowed
    assert g.check("k", spec, 0.0).allowed
    assert not g.check("k", spec, 0.0).allowed
    g.refund("k", spec)
    assert g.check("k", spec, 0.0).allowed
    assert not g.check("k", spec, 0.0).allowed
