"""Abuse control: repeated refusals earn a temporary, escalating, bounded block."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from portcullis.traffic.abuse import AbuseConfig, AbuseGuard


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def guard(clock: Clock, **kw: object) -> AbuseGuard:
    cfg = AbuseConfig.model_validate({"threshold": 5, "window_seconds": 60, "block_seconds": 30, **kw})
    return AbuseGuard(cfg, clock)


def test_threshold_refusals_then_a_block_that_ends() -> None:
    clock = Clock()
    g = guard(clock)
    for _ in range(5):
        assert not g.record("10.0.0.1", 401)
    assert g.blocked_for("10.0.0.1") == 0.0
    assert g.record("10.0.0.1", 403)  # the sixth within the window
    assert g.blocked_for("10.0.0.1") == 30.0
    assert g.blocked_for("10.0.0.2") == 0.0  # others unaffected
    clock.t += 29.5
    assert g.blocked_for("10.0.0.1") == pytest.approx(0.5)
    clock.t += 0.5
    assert g.blocked_for("10.0.0.1") == 0.0


def test_successes_and_unwatched_statuses_do_not_count() -> None:
    g = guard(Clock())
    for status in (200, 404, 500, 400) * 10:
        assert not g.record("10.0.0.1", status)
    assert g.blocked_for("10.0.0.1") == 0.0


def test_slow_refusals_below_the_rate_never_block() -> None:
    clock = Clock()
    g = guard(clock)
    for _ in range(100):
        clock.t += 12.5  # 5 per 60 s, just under the threshold's rate
        assert not g.record("10.0.0.1", 401)


def test_repeat_offenders_get_longer_blocks_up_to_the_maximum() -> None:
    clock = Clock()
    g = guard(clock, max_block_seconds=100)
    lengths = []
    for _ in range(4):
        while not g.record("10.0.0.1", 429):
            pass
        lengths.append(g.blocked_for("10.0.0.1"))
        clock.t += lengths[-1]
    assert lengths == [30, 60, 100, 100]


def test_ipv6_sources_group_by_prefix_and_exempt_networks_never_block() -> None:
    g = guard(Clock(), exempt=["192.0.2.0/24"])
    for i in range(6):
        g.record(f"2001:db8::{i:x}", 401)  # one /64, many addresses
    assert g.blocked_for("2001:db8::ffff") > 0
    assert g.blocked_for("2001:db8:0:1::1") == 0.0
    for _ in range(50):
        assert not g.record("192.0.2.7", 401)
    assert g.blocked_for("192.0.2.7") == 0.0


def test_memory_stays_bounded_under_many_sources() -> None:
    clock = Clock()
    g = guard(clock, threshold=1, max_sources=100)
    for i in range(5000):
        g.record(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 401)
        g.record(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 401)
    assert len(g._blocks) <= 100
    assert len(g._counts) <= 100


def test_config_rejects_server_error_statuses_and_bad_networks() -> None:
    with pytest.raises(ValidationError, match="not a 4xx"):
        AbuseConfig(statuses=[500])
    with pytest.raises(ValidationError, match="CIDR"):
        AbuseConfig(exempt=["nope"])
