"""Rate-limit decisions per second in process (pytest-benchmark; issue 6 target:
>= 500,000/s for a single-key check on the memory backend).

`make bench-micro`, or:
  PYTHONPATH=src:. .venv/bin/python -m pytest -p no:cacheprovider tests/bench/test_traffic_bench.py \
      --benchmark-only --benchmark-columns=min,median,mean,ops
The `ops` column is decisions per second. They assert behaviour, never speed.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from portcullis.exchange import Principal
from portcullis.stages.limit import LimitStage, RateLimitConfig, TrafficConfig
from portcullis.stages.route import RouteConfig, Router
from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.memory import MemoryRateBackend
from portcullis.traffic.protocols import LimitCheck
from tests.support import exchange

T = TypeVar("T")
SPEC = RateLimitSpec(10**9, 60, 10**6)


def run_ready(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the memory backend) without a loop round trip."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    raise AssertionError("the memory backend suspended")


def test_memory_check_one_key_sync(benchmark: Any) -> None:
    """The decision itself: `check_all_at`, one key."""
    b = MemoryRateBackend()
    checks = [LimitCheck("credential|abc", SPEC)]
    got = benchmark(lambda: b.check_all_at(checks, time.monotonic()))
    assert got[0].allowed


def test_memory_check_all_one_key(benchmark: Any) -> None:
    """Through the async `RateBackend.check_all` contract, one key."""
    b = MemoryRateBackend()
    checks = [LimitCheck("credential|abc", SPEC)]
    got = benchmark(lambda: run_ready(b.check_all(checks)))
    assert got[0].allowed


def test_memory_check_all_three_keys(benchmark: Any) -> None:
    """Tenant + client + credential in one all-or-nothing call."""
    b = MemoryRateBackend()
    checks = [LimitCheck("tenant|t:acme", SPEC), LimitCheck("client|k:c1", SPEC), LimitCheck("credential|abc", SPEC)]
    got = benchmark(lambda: run_ready(b.check_all(checks)))
    assert all(d.allowed for d in got)


def test_limit_stage_three_levels(benchmark: Any) -> None:
    """The whole limit stage (keys, headers) for global + tenant + the credential's own limit."""
    big = {"requests": 10**9, "per_seconds": 60, "burst": 10**6}
    policies = {"g": RateLimitConfig(**big, key="global"), "t": RateLimitConfig(**big, key="tenant")}
    stage = LimitStage(policies, MemoryRateBackend(), traffic=TrafficConfig(rate_limits=["g", "t"]))
    router = Router([RouteConfig(name="r", path="/r", methods=["GET"], upstream="u", auth=["api_key"])])
    found = router.resolve("gw", "GET", "/r")
    assert not isinstance(found, list)
    p = Principal("s", "acme", "cid", "api_key", frozenset(), rate_limit=(10**9, 60.0, 10**6))

    def one() -> object:
        ex = exchange()
        ex.route, ex.principal = found[0], p
        return run_ready(stage.on_request(ex))

    assert benchmark(one) is None
