"""limit: rates, bursts and quotas at several levels at once (DESIGN.md, step 6);
admission: abuse denials and gateway-wide limits before authentication.

**LimitStage.** A request passes when every limit that applies to it admits it:

- the named policies of ``traffic.rate_limits`` (every route) and the route's own
  ``rate_limit``, each counted per its key — ``global`` (one bucket for the gateway),
  ``tenant``, ``client``, ``credential``, ``route`` or ``ip``;
- the credential's own limit (stored with an API key, else ``keys.default_rate_limit``);
- quotas per tenant and per client per calendar day and month (``traffic.quotas``).

Limits counted per principal (``credential``, ``client``, the credential's own) are
scaled by the `TrustSignal` when one is configured (`portcullis.traffic.adaptive`).

All or nothing: the rates are one `RateBackend.check_all`; quotas are consumed
first and given back (negative cost) when a rate or another quota refuses, so a
refused request uses up nothing anywhere. Every answer of a limited route carries
``RateLimit-Policy`` (every applicable limit) and ``RateLimit`` (the tightest)
(draft-ietf-httpapi-ratelimit-headers-10 §4, §5, structured fields:
``"name";q=<quota>;w=<window>`` and ``"name";r=<remaining>;t=<reset>``); a refusal
is a 429 with ``Retry-After`` (RFC 9110 §10.2.3): for a quota, when its period ends.

When a backend cannot answer (`BackendUnavailable`), the stage refuses with 503
(fail closed). Failing open to per-node local limits is the backend's business
(`portcullis.traffic.failover`, configured by ``redis.on_failure``): such a backend
answers instead of raising.

**AdmissionStage** runs right after normalize, before any authentication cost:
sources with too many recent refusals are turned away (`portcullis.traffic.abuse`),
then the ``traffic.admission`` policies (keys ``global`` or ``ip``), which protect
the gateway itself, are checked. As a completion stage it counts each answer's
status for the abuse guard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.exchange import Exchange, Principal
from portcullis.problems import Problem
from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.abuse import AbuseConfig, AbuseGuard
from portcullis.traffic.adaptive import AdaptiveConfig, TrustSignal, scale
from portcullis.traffic.concurrency import ConcurrencyConfig
from portcullis.traffic.gcra import Decision, MemoryGcra
from portcullis.traffic.memory import MemoryRateBackend
from portcullis.traffic.protocols import BackendUnavailable, LimitCheck, QuotaBackend, QuotaDecision, RateBackend
from portcullis.traffic.quota import PERIODS, Period, period_window
from portcullis.tz import iana_zone

log = logging.getLogger("portcullis.limit")

LimitKey = Literal["credential", "client", "tenant", "ip", "route", "global"]
#: Keys counted per principal: the ones the trust signal scales.
PRINCIPAL_KEYS = frozenset({"credential", "client"})
#: Keys known before authentication: the only ones `traffic.admission` may use.
ADMISSION_KEYS = frozenset({"global", "ip"})


class RateLimitConfig(BaseModel):
    """A named policy: `requests` per `per_seconds` sustained, `burst` at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(gt=0, le=10**12)
    per_seconds: float = Field(gt=0, le=86_400 * 31)
    burst: int = Field(gt=0, le=10**9)
    key: LimitKey = "credential"

    def spec(self) -> RateLimitSpec:
        return RateLimitSpec(self.requests, self.per_seconds, self.burst)


class QuotaLimits(BaseModel):
    """Requests per calendar day and/or month (either may be left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    day: int | None = Field(default=None, ge=1, le=10**12)
    month: int | None = Field(default=None, ge=1, le=10**13)

    @model_validator(mode="after")
    def _some(self) -> QuotaLimits:
        if self.day is None and self.month is None:
            raise ValueError("set 'day', 'month' or both")
        return self

    def get(self, period: Period) -> int | None:
        return self.day if period == "day" else self.month


class QuotaConfig(BaseModel):
    """`traffic.quotas`: calendar quotas per tenant and per client, in `timezone`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = "UTC"
    per_tenant: QuotaLimits | None = None
    per_client: QuotaLimits | None = None
    tenants: dict[str, QuotaLimits] = Field(default_factory=dict)  # replace per_tenant for these
    clients: dict[str, QuotaLimits] = Field(default_factory=dict)  # replace per_client for these
    flush_seconds: float = Field(default=1.0, gt=0, le=60)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return iana_zone(v)

    @property
    def enabled(self) -> bool:
        return bool(self.per_tenant or self.per_client or self.tenants or self.clients)


class TrafficConfig(BaseModel):
    """`traffic:` — what issue 6 adds to the limit stage; `rate_limits:` stays as it was."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_limits: list[str] = Field(default_factory=list, max_length=20)  # on every route
    admission: list[str] = Field(default_factory=list, max_length=10)  # before authentication
    quotas: QuotaConfig = QuotaConfig()
    concurrency: ConcurrencyConfig = ConcurrencyConfig()
    abuse: AbuseConfig | None = None
    adaptive: AdaptiveConfig | None = None


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    key: LimitKey
    spec: RateLimitSpec
    window: int


@dataclass(slots=True)
class _Quota:
    name: str
    key: str
    period: str
    limit: int
    starts_at: float
    resets_at: float


class LimitStage:
    """Applies rates and quotas; adds RateLimit headers to every answer of a limited route."""

    name: ClassVar[str] = "limit"

    def __init__(self, policies: dict[str, RateLimitConfig], limiter: RateBackend | MemoryGcra,
                 credential_default: RateLimitSpec | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 traffic: TrafficConfig | None = None, quotas: QuotaBackend | None = None,
                 trust: TrustSignal | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        """`limiter` is the rate backend; a bare `MemoryGcra` (the earlier signature)
        stands for a fresh `MemoryRateBackend` on `clock`. `quotas` is required when
        `traffic.quotas` sets any. Quotas use `wall_clock` (epoch seconds)."""
        traffic = traffic or TrafficConfig()
        self._policies = {n: _Policy(n, p.key, p.spec(), _window(p.per_seconds)) for n, p in policies.items()}
        self._rates: RateBackend = (MemoryRateBackend(clock=clock) if isinstance(limiter, MemoryGcra)
                                    else limiter)
        self._credential_default = credential_default
        self._everywhere = [self._policies[n] for n in traffic.rate_limits]
        self._quota_cfg = traffic.quotas if traffic.quotas.enabled else None
        if self._quota_cfg is not None and quotas is None:
            raise ValueError("traffic.quotas needs a quota backend")
        self._quotas = quotas
        self._tz = ZoneInfo(traffic.quotas.timezone)
        self._trust = trust
        self._wall = wall_clock
        self._outage = False
        self._route_policies: dict[str, list[_Policy]] = {}
        self._header_cache: dict[tuple[str, tuple[int, float, int] | None, float, int], bytes] = {}

    def _policies_of(self, route_name: str, own: str | None) -> list[_Policy]:
        found = self._route_policies.get(route_name)
        if found is None:
            found = list(self._everywhere)
            if own is not None and all(p.name != own for p in found):
                found.append(self._policies[own])
            self._route_policies[route_name] = found
        return found

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return None
        p = ex.principal
        policies = self._policies_of(route.name, route.config.rate_limit)
        m = 1.0
        if p is not None and self._trust is not None:
            m = self._trust.multiplier(p, self._wall())
        names: list[str] = []
        checks: list[LimitCheck] = []
        for pol in policies:
            spec = scale(pol.spec, m) if pol.key in PRINCIPAL_KEYS and p is not None else pol.spec
            names.append(pol.name)
            checks.append(LimitCheck(f"{pol.name}|{_subject(pol.key, ex, p, route.name)}", spec))
        if p is not None:
            own = RateLimitSpec(*p.rate_limit) if p.rate_limit else self._credential_default
            if own is not None:
                names.append("credential")
                checks.append(LimitCheck("credential|" + (p.limit_key or p.credential_id), scale(own, m)))
        quotas = self._quotas_for(p) if self._quota_cfg is not None and p is not None else []
        if not checks and not quotas:
            return None
        # -- quotas first (they can be given back), then the rates in one call --------
        qdecisions: list[QuotaDecision] = []
        if quotas:
            got = await self._consume(quotas, ex)
            if isinstance(got, Problem):
                return got
            qdecisions = got
            refused_q = next((i for i, d in enumerate(qdecisions) if not d.allowed), None)
            if refused_q is not None:
                await self._give_back(quotas[:refused_q])
                return self._refuse_quota(ex, _policy_header(names, checks, quotas), quotas[refused_q])
        decisions: list[Decision] = []
        if checks:
            got_rates = await self._check(checks, ex)
            if isinstance(got_rates, Problem):
                await self._give_back(quotas)
                return got_rates
            decisions = got_rates
        if quotas:
            header = _policy_header(names, checks, quotas)
        else:
            # The same route, own limit and multiplier always give the same header.
            hkey = (route.name, p.rate_limit if p is not None else None, m, len(checks))
            cached = self._header_cache.get(hkey)
            if cached is None:
                if len(self._header_cache) >= 10_000:
                    self._header_cache.clear()
                cached = self._header_cache[hkey] = _policy_header(names, checks, quotas)
            header = cached
        ex.response_headers.append((b"ratelimit-policy", header))
        refused = [(n, d) for n, d in zip(names, decisions, strict=True) if not d.allowed]
        if refused:
            await self._give_back(quotas)
            n, d = max(refused, key=lambda r: r[1].retry_after)
            retry = max(1, math.ceil(d.retry_after))
            ex.facts["rate_limit"] = n
            return Problem(429, "rate-limited", "limit.rate", f"Rate limit '{n}' exceeded; retry later.",
                           headers=[(b"retry-after", str(retry).encode()),
                                    (b"ratelimit", f'"{n}";r=0;t={retry}'.encode())])
        # The tightest: fewest requests left, rates and quotas alike.
        best: tuple[int, str, int] | None = None
        for n, d in zip(names, decisions, strict=True):
            if best is None or d.remaining < best[0]:
                best = (d.remaining, n, math.ceil(d.reset_after))
        now = self._wall()
        for q, qd in zip(quotas, qdecisions, strict=True):
            left = max(0, q.limit - qd.used)
            if best is None or left < best[0]:
                best = (left, q.name, max(1, math.ceil(q.resets_at - now)))
        assert best is not None
        ex.response_headers.append((b"ratelimit", f'"{best[1]}";r={best[0]};t={best[2]}'.encode()))
        return None

    # -- quotas ----------------------------------------------------------------------

    def _quotas_for(self, p: Principal) -> list[_Quota]:
        cfg = self._quota_cfg
        assert cfg is not None
        out: list[_Quota] = []
        now = self._wall()
        client = p.client_id or p.limit_key or p.credential_id
        for who, key, limits in (("tenant", "tenant:" + p.tenant, cfg.tenants.get(p.tenant, cfg.per_tenant)),
                                 ("client", "client:" + client, cfg.clients.get(client, cfg.per_client))):
            if limits is None:
                continue
            for period in PERIODS:
                limit = limits.get(period)
                if limit is None:
                    continue
                pkey, starts, resets = period_window(period, now, self._tz)
                out.append(_Quota(f"quota-{who}-{period}", key, pkey, limit, starts, resets))
        return out

    async def _consume(self, quotas: Sequence[_Quota], ex: Exchange) -> list[QuotaDecision] | Problem:
        assert self._quotas is not None
        out: list[QuotaDecision] = []
        try:
            for i, q in enumerate(quotas):
                d = await self._quotas.consume(q.key, q.period, q.limit, q.resets_at)
                out.append(d)
                if not d.allowed:
                    # The ones after it are not consumed; report them as untouched.
                    out += [QuotaDecision(True, 0, r.limit, r.resets_at) for r in quotas[i + 1:]]
                    break
        except BackendUnavailable as exc:
            await self._give_back([q for q, d in zip(quotas, out, strict=False) if d.allowed])
            return self._unavailable(ex, exc)
        return out

    async def _give_back(self, quotas: Sequence[_Quota]) -> None:
        if not quotas or self._quotas is None:
            return
        for q in quotas:
            try:
                await self._quotas.consume(q.key, q.period, q.limit, q.resets_at, cost=-1)
            except Exception as exc:  # the count stays one too high: the safe side, and the
                # refusal this follows must still be answered (not turned into a 500).
                log.warning("quota give-back failed: %s", type(exc).__name__)

    def _refuse_quota(self, ex: Exchange, policy_header: bytes, q: _Quota) -> Problem:
        retry = max(1, math.ceil(q.resets_at - self._wall()))
        ex.response_headers.append((b"ratelimit-policy", policy_header))
        ex.facts["rate_limit"] = q.name
        return Problem(429, "rate-limited", "limit.quota",
                       f"Quota '{q.name}' ({q.limit} per {q.name.rsplit('-', 1)[1]}) used up; "
                       f"it resets at the start of the next period.",
                       headers=[(b"retry-after", str(retry).encode()),
                                (b"ratelimit", f'"{q.name}";r=0;t={retry}'.encode())])

    # -- rates -----------------------------------------------------------------------

    async def _check(self, checks: list[LimitCheck], ex: Exchange) -> list[Decision] | Problem:
        try:
            decisions = await self._rates.check_all(checks)
        except BackendUnavailable as exc:
            return self._unavailable(ex, exc)
        if self._outage:
            self._outage = False
            log.warning("limit backend answers again")
        return decisions

    def _unavailable(self, ex: Exchange, exc: BackendUnavailable) -> Problem:
        if not self._outage:
            self._outage = True
            log.error("rate-limit backend unavailable (%s): refusing requests (fail closed)", exc)
        return Problem(503, "service-unavailable", "limit.backend_unavailable",
                       "The gateway cannot check its limits right now; retry shortly.",
                       headers=[(b"retry-after", b"1")])

    async def close(self) -> None:
        await self._rates.close()
        if self._quotas is not None:
            await self._quotas.close()


class AdmissionStage:
    """Abuse denials and gateway-wide limits, before authentication (see the module doc)."""

    name: ClassVar[str] = "admission"

    def __init__(self, policies: dict[str, RateLimitConfig], names: Sequence[str], rates: RateBackend,
                 guard: AbuseGuard | None, abuse_status: int = 429) -> None:
        self._policies = [_Policy(n, policies[n].key, policies[n].spec(), _window(policies[n].per_seconds))
                          for n in names]
        for pol in self._policies:
            if pol.key not in ADMISSION_KEYS:
                raise ValueError(f"admission policy {pol.name!r} has key {pol.key!r}; only global or ip")
        self._rates = rates
        self._guard = guard
        self._abuse_status = abuse_status

    async def on_request(self, ex: Exchange) -> Problem | None:
        guard = self._guard
        if guard is not None:
            left = guard.blocked_for(ex.client_ip)
            if left > 0:
                wait = str(max(1, math.ceil(left))).encode()
                detail = "Too many refused requests from this address; retry after the time in Retry-After."
                if self._abuse_status == 403:
                    return Problem(403, "forbidden", "abuse.blocked", detail, headers=[(b"retry-after", wait)])
                return Problem(429, "rate-limited", "abuse.blocked", detail, headers=[(b"retry-after", wait)])
        if not self._policies:
            return None
        checks = [LimitCheck(f"{p.name}|{_subject(p.key, ex, None, '')}", p.spec) for p in self._policies]
        try:
            decisions = await self._rates.check_all(checks)
        except BackendUnavailable:
            return Problem(503, "service-unavailable", "limit.backend_unavailable",
                           "The gateway cannot check its limits right now; retry shortly.",
                           headers=[(b"retry-after", b"1")])
        refused = [(p, d) for p, d in zip(self._policies, decisions, strict=True) if not d.allowed]
        if not refused:
            return None
        pol, d = max(refused, key=lambda r: r[1].retry_after)
        retry = max(1, math.ceil(d.retry_after))
        ex.facts["rate_limit"] = pol.name
        return Problem(429, "rate-limited", "limit.admission", f"Rate limit '{pol.name}' exceeded; retry later.",
                       headers=[(b"retry-after", str(retry).encode()),
                                (b"ratelimit-policy", f'"{pol.name}";q={pol.spec.requests};w={pol.window}'.encode()),
                                (b"ratelimit", f'"{pol.name}";r=0;t={retry}'.encode())])

    def on_complete(self, ex: Exchange) -> None:
        # The guard's own refusals do not count, or a block would renew itself forever.
        if self._guard is not None and ex.status and ex.reason != "abuse.blocked":
            self._guard.record(ex.client_ip, ex.status)


def _subject(key: str, ex: Exchange, p: Principal | None, route_name: str) -> str:
    if key == "global":
        return "*"
    if p is not None:
        if key == "credential":
            return "c:" + (p.limit_key or p.credential_id)
        if key == "client":
            return "k:" + (p.client_id or p.limit_key or p.credential_id)
        if key == "tenant":
            return "t:" + p.tenant
    if key == "route":
        return "r:" + route_name
    return "i:" + ex.client_ip  # ip, or no principal on a public route


def _policy_header(names: list[str], checks: list[LimitCheck], quotas: list[_Quota]) -> bytes:
    """``RateLimit-Policy``: every applicable limit; a quota's window is its period's length."""
    items = [f'"{n}";q={c.spec.requests};w={_window(c.spec.per_seconds)}' for n, c in zip(names, checks, strict=True)]
    items += [f'"{q.name}";q={q.limit};w={max(1, round(q.resets_at - q.starts_at))}' for q in quotas]
    return ", ".join(items).encode()


def _window(per_seconds: float) -> int:
    return max(1, math.ceil(per_seconds))
