"""The trust signal: warm-up, partners, risk."""

from __future__ import annotations

import pytest

from portcullis.exchange import Principal
from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.adaptive import AdaptiveConfig, MemoryFirstSeen, TrustPolicy, TrustSignal, scale


def principal(tenant: str = "acme", client: str | None = "c1") -> Principal:
    return Principal("s", tenant, "cred", "jwt", frozenset(), client_id=client, limit_key=f"jwt:iss:{client}")


class FixedRisk:
    def __init__(self, score: int) -> None:
        self.score = score

    def risk(self, principal: object) -> int:
        return self.score


def test_new_clients_start_lower_and_ramp_up_over_the_warm_up() -> None:
    seen = MemoryFirstSeen()
    t: TrustSignal = TrustPolicy(AdaptiveConfig(warmup_seconds=100, new_client_multiplier=0.2), first_seen=seen)
    p = principal()
    assert t.multiplier(p, 1000.0) == pytest.approx(0.2)
    assert t.multiplier(p, 1050.0) == pytest.approx(0.6)
    assert t.multiplier(p, 1100.0) == 1.0
    assert t.multiplier(principal(client="c2"), 1100.0) == pytest.approx(0.2)  # its own clock


def test_trusted_partners_get_more_and_skip_the_warm_up() -> None:
    t = TrustPolicy(AdaptiveConfig(warmup_seconds=100, trusted_tenants={"acme": 2.0},
                                   trusted_clients={"gold": 5.0}), first_seen=MemoryFirstSeen())
    assert t.multiplier(principal(), 0.0) == 2.0
    assert t.multiplier(principal(client="gold"), 0.0) == 5.0  # client beats tenant
    assert t.multiplier(principal(tenant="other"), 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize(("score", "factor"), [(0, 1.0), (50, 0.55), (100, 0.1), (250, 0.1)])
def test_risk_lowers_the_limit(score: int, factor: float) -> None:
    t = TrustPolicy(AdaptiveConfig(risk_floor=0.1), risk=FixedRisk(score))
    assert t.multiplier(principal(), 0.0) == pytest.approx(factor)


def test_partner_and_risk_combine() -> None:
    t = TrustPolicy(AdaptiveConfig(trusted_tenants={"acme": 4.0}, risk_floor=0.5), risk=FixedRisk(100))
    assert t.multiplier(principal(), 0.0) == pytest.approx(2.0)


def test_scale_keeps_at_least_one_request() -> None:
    spec = RateLimitSpec(10, 60, 4)
    assert scale(spec, 1.0) is spec
    assert scale(spec, 0.01) == RateLimitSpec(1, 60, 1)
    assert scale(spec, 2.5) == RateLimitSpec(25, 60, 10)


def test_warm_up_needs_a_first_seen_source() -> None:
    with pytest.raises(ValueError, match="first-seen"):
        TrustPolicy(AdaptiveConfig(warmup_seconds=10))
