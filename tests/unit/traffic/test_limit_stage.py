"""The limit stage over several levels at once, quotas, trust; the admission stage."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from portcullis.exchange import Exchange, Principal
from portcullis.problems import Problem
from portcullis.stages.limit import AdmissionStage, LimitStage, RateLimitConfig, TrafficConfig
from portcullis.stages.route import RouteConfig, Router
from portcullis.traffic.abuse import AbuseConfig, AbuseGuard
from portcullis.traffic.adaptive import AdaptiveConfig, MemoryFirstSeen, TrustPolicy
from portcullis.traffic.gcra import Decision
from portcullis.traffic.memory import MemoryRateBackend
from portcullis.traffic.protocols import BackendUnavailable, LimitCheck, QuotaDecision
from portcullis.traffic.quota import SqliteQuotaBackend
from tests.support import exchange

ROUTER = Router([
    RouteConfig(name="projects", path="/t/{tenant}/projects", methods=["GET"], upstream="u", auth=["api_key"]),
    RouteConfig(name="reports", path="/t/{tenant}/reports", methods=["GET"], upstream="u", auth=["api_key"],
                rate_limit="reports"),
    RouteConfig(name="open", path="/open", methods=["GET"], upstream="u", public=True),
])
BIG = {"requests": 1000, "per_seconds": 60, "burst": 1000}
POLICIES = {
    "global": RateLimitConfig(**BIG, key="global"),
    "tenant": RateLimitConfig(**BIG, key="tenant"),
    "client": RateLimitConfig(**BIG, key="client"),
    "route": RateLimitConfig(**BIG, key="route"),
    "ip": RateLimitConfig(**BIG, key="ip"),
    "reports": RateLimitConfig(requests=2, per_seconds=60, burst=2, key="credential"),
    "tiny-ip": RateLimitConfig(requests=1, per_seconds=60, burst=1, key="ip"),
}
BERLIN_EVENING = datetime.fromisoformat("2026-11-29T23:59:58+01:00").timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def p(tenant: str = "acme", cred: str = "k1", client: str | None = None,
      own: tuple[int, float, int] | None = None) -> Principal:
    return Principal("s", tenant, cred, "api_key", frozenset(), client_id=client, rate_limit=own)


def routed(path: str, principal: Principal | None, ip: str = "10.0.0.1") -> Exchange:
    ex = exchange("GET", path.encode(), client_ip=ip)
    ex.path = path
    found = ROUTER.resolve("gw", "GET", path)
    assert not isinstance(found, list)
    ex.route, ex.path_params = found
    ex.principal = principal
    return ex


def headers(ex: Exchange) -> dict[bytes, bytes]:
    return dict(ex.response_headers)


async def test_every_level_is_checked_at_once_and_reported() -> None:
    traffic = TrafficConfig(rate_limits=["global", "tenant", "client", "route", "ip"])
    stage = LimitStage(POLICIES, MemoryRateBackend(), traffic=traffic)
    ex = routed("/t/acme/reports", p(own=(10, 60, 5)))
    assert await stage.on_request(ex) is None
    policy = headers(ex)[b"ratelimit-policy"].decode()
    for name in ("global", "tenant", "client", "route", "ip", "reports", "credential"):
        assert f'"{name}";' in policy
    assert headers(ex)[b"ratelimit"] == b'"reports";r=1;t=30'


async def test_one_refusal_consumes_nothing_at_any_level() -> None:
    rates = MemoryRateBackend()
    traffic = TrafficConfig(rate_limits=["global", "tenant"])
    stage = LimitStage(POLICIES, rates, traffic=traffic)
    for _ in range(2):
        assert await stage.on_request(routed("/t/acme/reports", p())) is None
    for _ in range(10):
        refused = await stage.on_request(routed("/t/acme/reports", p()))
        assert refused is not None and refused.status == 429 and refused.reason == "limit.rate"
        assert dict(refused.headers)[b"retry-after"] == b"30"
    (g, t) = await rates.check_all([LimitCheck("global|*", POLICIES["global"].spec()),
                                    LimitCheck("tenant|t:acme", POLICIES["tenant"].spec())])
    assert g.remaining == t.remaining == 1000 - 3  # two admitted + this probe; no refusal counted


async def test_global_limit_is_shared_by_everyone_and_tenant_limits_are_not() -> None:
    policies = {**POLICIES, "g2": RateLimitConfig(requests=3, per_seconds=60, burst=3, key="global"),
                "t1": RateLimitConfig(requests=1, per_seconds=60, burst=1, key="tenant")}
    stage = LimitStage(policies, MemoryRateBackend(), traffic=TrafficConfig(rate_limits=["t1"]))
    assert await stage.on_request(routed("/t/acme/projects", p("acme"))) is None
    assert await stage.on_request(routed("/t/acme/projects", p("acme", "k2"))) is not None  # same tenant
    assert await stage.on_request(routed("/t/globex/projects", p("globex"))) is None
    stage = LimitStage(policies, MemoryRateBackend(), traffic=TrafficConfig(rate_limits=["g2"]))
    results = [await stage.on_request(routed("/t/x/projects", p(f"t{i}", f"k{i}"), ip=f"10.0.0.{i}"))
               for i in range(5)]
    assert [r is None for r in results] == [True, True, True, False, False]


async def test_public_routes_count_principal_keys_per_ip() -> None:
    stage = LimitStage(POLICIES, MemoryRateBackend(), traffic=TrafficConfig(rate_limits=["tiny-ip"]))
    assert await stage.on_request(routed("/open", None)) is None
    assert await stage.on_request(routed("/open", None)) is not None
    assert await stage.on_request(routed("/open", None, ip="10.0.0.2")) is None


def quota_stage(tmp_path: Path, wall: Clock, **quotas: object) -> tuple[LimitStage, SqliteQuotaBackend]:
    store = SqliteQuotaBackend(tmp_path / "q.db", clock=wall)
    traffic = TrafficConfig.model_validate({"quotas": {"timezone": "Europe/Berlin", **quotas}})
    return LimitStage(POLICIES, MemoryRateBackend(), traffic=traffic, quotas=store, wall_clock=wall), store


async def test_day_quota_resets_exactly_at_local_midnight(tmp_path: Path) -> None:
    wall = Clock(BERLIN_EVENING)
    stage, store = quota_stage(tmp_path, wall, per_tenant={"day": 2})
    for _ in range(2):
        ex = routed("/t/acme/projects", p())
        assert await stage.on_request(ex) is None
    assert b'"quota-tenant-day";q=2;w=86400' in headers(ex)[b"ratelimit-policy"]
    assert headers(ex)[b"ratelimit"] == b'"quota-tenant-day";r=0;t=2'
    ex = routed("/t/acme/projects", p())
    refused = await stage.on_request(ex)
    assert refused is not None and refused.reason == "limit.quota" and refused.status == 429
    assert dict(refused.headers)[b"retry-after"] == b"2"  # 23:59:58 -> midnight
    assert ex.facts["rate_limit"] == "quota-tenant-day"
    assert await stage.on_request(routed("/t/globex/projects", p("globex"))) is None  # per tenant
    wall.t = BERLIN_EVENING + 1.999
    assert await stage.on_request(routed("/t/acme/projects", p())) is not None
    wall.t = BERLIN_EVENING + 2.0  # 00:00:00 local: a new day, a new quota
    assert await stage.on_request(routed("/t/acme/projects", p())) is None
    await store.close()


async def test_month_quota_across_month_end_and_dst_day(tmp_path: Path) -> None:
    wall = Clock(datetime.fromisoformat("2026-10-31T23:59:00+01:00").timestamp())
    stage, store = quota_stage(tmp_path, wall, per_client={"month": 1})
    assert await stage.on_request(routed("/t/acme/projects", p())) is None
    refused = await stage.on_request(routed("/t/acme/projects", p()))
    assert refused is not None and dict(refused.headers)[b"retry-after"] == b"60"
    wall.t += 60
    ex = routed("/t/acme/projects", p())
    assert await stage.on_request(ex) is None
    assert b'"quota-client-month";q=1;w=2592000' in headers(ex)[b"ratelimit-policy"]  # 30 days of November
    # October 2026 in Berlin has a 25-hour day: 31 * 86400 + 3600 seconds.
    wall.t = datetime.fromisoformat("2026-10-15T12:00:00+02:00").timestamp()
    ex = routed("/t/acme/projects", p("acme", "k9"))
    assert await stage.on_request(ex) is None
    assert f'"quota-client-month";q=1;w={31 * 86400 + 3600}'.encode() in headers(ex)[b"ratelimit-policy"]
    await store.close()


async def test_quota_overrides_per_tenant_and_client(tmp_path: Path) -> None:
    wall = Clock(BERLIN_EVENING - 3600)
    stage, store = quota_stage(tmp_path, wall, per_tenant={"day": 1}, tenants={"big": {"day": 3}})
    assert sum([await stage.on_request(routed("/t/big/projects", p("big"))) is None for _ in range(5)]) == 3
    assert sum([await stage.on_request(routed("/t/small/projects", p("small"))) is None for _ in range(5)]) == 1
    await store.close()


async def test_rate_refusal_gives_the_quota_back_and_quota_refusal_takes_no_rate(tmp_path: Path) -> None:
    wall = Clock(BERLIN_EVENING - 3600)
    stage, store = quota_stage(tmp_path, wall, per_tenant={"day": 3})
    for _ in range(2):
        assert await stage.on_request(routed("/t/acme/reports", p())) is None
    for _ in range(5):  # 'reports' (2 per minute) refuses: the quota must not move
        refused = await stage.on_request(routed("/t/acme/reports", p()))
        assert refused is not None and refused.reason == "limit.rate"
    assert (await store.consume("tenant:acme", "2026-11-29", 3, 0)).used == 3  # 2 + this probe
    # Quota used up: requests refused by it take nothing from the rates.
    rates = MemoryRateBackend()
    stage2 = LimitStage(POLICIES, rates, traffic=TrafficConfig.model_validate(
        {"rate_limits": ["tenant"], "quotas": {"per_tenant": {"day": 3}, "timezone": "Europe/Berlin"}}),
        quotas=store, wall_clock=wall)
    for _ in range(4):
        refused = await stage2.on_request(routed("/t/acme/projects", p()))
        assert refused is not None and refused.reason == "limit.quota"
    (d,) = await rates.check_all([LimitCheck("tenant|t:acme", POLICIES["tenant"].spec())])
    assert d.remaining == 999
    await store.close()


async def test_trust_scales_only_principal_limits() -> None:
    seen = MemoryFirstSeen()
    trust = TrustPolicy(AdaptiveConfig(warmup_seconds=3600, new_client_multiplier=0.25), first_seen=seen)
    stage = LimitStage(POLICIES, MemoryRateBackend(), traffic=TrafficConfig(rate_limits=["tenant"]),
                       trust=trust, wall_clock=lambda: 1000.0)
    ex = routed("/t/acme/projects", p(own=(40, 60, 8)))
    assert await stage.on_request(ex) is None
    policy = headers(ex)[b"ratelimit-policy"]
    assert b'"credential";q=10;w=60' in policy  # 40 x 0.25
    assert b'"tenant";q=1000;w=60' in policy  # not scaled
    admitted = sum([await stage.on_request(routed("/t/acme/projects", p(own=(40, 60, 8)))) is None
                    for _ in range(10)])
    assert admitted == 1  # burst 8 x 0.25 = 2, one used above


class DownRates:
    """A `RateBackend` whose server is gone (what a Redis backend raises then)."""

    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        raise BackendUnavailable("connection refused")

    async def close(self) -> None:
        return None


class DownQuotas:
    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        raise BackendUnavailable("timeout")

    async def close(self) -> None:
        return None


async def test_backend_outage_fails_closed_with_503() -> None:
    stage = LimitStage(POLICIES, DownRates())
    refused = await stage.on_request(routed("/t/acme/reports", p()))
    assert refused is not None and (refused.status, refused.reason) == (503, "limit.backend_unavailable")
    assert dict(refused.headers)[b"retry-after"] == b"1"
    stage = LimitStage(POLICIES, MemoryRateBackend(), quotas=DownQuotas(),
                       traffic=TrafficConfig.model_validate({"quotas": {"per_tenant": {"day": 5}}}))
    refused = await stage.on_request(routed("/t/acme/projects", p()))
    assert refused is not None and refused.status == 503


async def test_routes_without_limits_get_no_headers() -> None:
    stage = LimitStage(POLICIES, MemoryRateBackend())
    ex = routed("/t/acme/projects", p())
    assert await stage.on_request(ex) is None
    assert ex.response_headers == []


def test_quotas_need_a_backend() -> None:
    with pytest.raises(ValueError, match="quota backend"):
        LimitStage(POLICIES, MemoryRateBackend(),
                   traffic=TrafficConfig.model_validate({"quotas": {"per_tenant": {"day": 5}}}))


# -- admission -----------------------------------------------------------------------

def admission(clock: Clock, **kw: object) -> AdmissionStage:
    guard = AbuseGuard(AbuseConfig.model_validate({"threshold": 3, "window_seconds": 60, "block_seconds": 20}),
                       clock)
    return AdmissionStage(POLICIES, [], MemoryRateBackend(), guard, **kw)  # type: ignore[arg-type]


async def answer(stage: AdmissionStage, status: int, ip: str = "10.0.0.1") -> tuple[Exchange, Problem | None]:
    ex = exchange(client_ip=ip)
    problem = await stage.on_request(ex)
    if problem is not None:
        ex.status, ex.reason = problem.status, problem.reason
    else:
        ex.status, ex.reason = status, "auth.key_unknown"
    stage.on_complete(ex)
    return ex, problem


async def test_repeated_401s_earn_a_block_that_says_when_to_retry() -> None:
    clock = Clock(100.0)
    stage = admission(clock)
    for _ in range(4):
        _, problem = await answer(stage, 401)
        assert problem is None
    _, problem = await answer(stage, 200)
    assert problem is not None and (problem.status, problem.slug, problem.reason) == (429, "rate-limited",
                                                                                     "abuse.blocked")
    assert dict(problem.headers)[b"retry-after"] == b"20"
    _, other = await answer(stage, 200, ip="10.0.0.2")
    assert other is None
    clock.t += 10
    for _ in range(20):  # its own refusals do not extend the block
        await answer(stage, 200)
    clock.t += 10
    _, problem = await answer(stage, 200)
    assert problem is None


async def test_abuse_block_can_answer_403() -> None:
    stage = admission(Clock(0.0), abuse_status=403)
    for _ in range(4):
        await answer(stage, 403)
    _, problem = await answer(stage, 200)
    assert problem is not None and (problem.status, problem.slug) == (403, "forbidden")
    assert b"retry-after" in dict(problem.headers)


async def test_admission_limits_protect_the_gateway_before_authentication() -> None:
    policies = {**POLICIES, "gw": RateLimitConfig(requests=2, per_seconds=1, burst=2, key="global")}
    stage = AdmissionStage(policies, ["gw"], MemoryRateBackend(), None)
    got = [await stage.on_request(exchange(client_ip=f"10.0.0.{i}")) for i in range(3)]
    assert got[0] is None and got[1] is None
    refused = got[2]
    assert refused is not None and refused.reason == "limit.admission"
    hdrs = dict(refused.headers)
    assert hdrs[b"retry-after"] == b"1" and hdrs[b"ratelimit-policy"] == b'"gw";q=2;w=1'
    with pytest.raises(ValueError, match="only global or ip"):
        AdmissionStage(POLICIES, ["tenant"], MemoryRateBackend(), None)
