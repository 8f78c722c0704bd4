"""Adaptive throttling: a principal's effective limit follows a trust/risk signal.

The limit stage asks a `TrustSignal` for a multiplier per request and scales the
limits counted per principal (credential or client: the route's policy with such a
key, and the credential's own limit): ``effective = base x multiplier``, both the
rate and the burst, never below one request. Limits counted per tenant, IP, route or
for the whole gateway are not scaled: one principal's standing must not change what
its neighbours get.

`TrustPolicy` is the configured signal, the product of three factors:

- warm-up: a principal first seen less than `warmup_seconds` ago starts at
  `new_client_multiplier` and ramps linearly to 1 over the warm-up;
- partners: configured trusted tenants or clients get their own multiplier (above 1
  for more) and skip the warm-up;
- risk: a `RiskProvider` scores the principal 0-100 (0 until detection exists:
  `NoRisk`); the factor falls linearly from 1 at score 0 to `risk_floor` at 100.

The product is clamped to [`MIN_MULTIPLIER`, `MAX_MULTIPLIER`].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from portcullis.storage.protocols import RateLimitSpec

MIN_MULTIPLIER = 0.01
MAX_MULTIPLIER = 100.0


class PrincipalLike(Protocol):
    """What the trust signal reads of a principal (`portcullis.exchange.Principal`)."""

    @property
    def tenant(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def credential_id(self) -> str: ...
    @property
    def limit_key(self) -> str | None: ...


class TrustSignal(Protocol):
    def multiplier(self, principal: PrincipalLike, now: float) -> float:
        """Factor for the principal's limits at epoch time `now`; 1.0 is "as configured".
        Must be cheap (called on every request) and must not raise."""
        ...


class RiskProvider(Protocol):
    def risk(self, principal: PrincipalLike) -> int:
        """Risk score 0 (none) to 100 (certain abuse); cheap, never raises."""
        ...


class FirstSeenSource(Protocol):
    def first_seen(self, key: str, now: float) -> float:
        """When `key` was first seen; records `now` if it never was."""
        ...


class NoRisk:
    """The risk provider until detection exists: every principal scores 0."""

    def risk(self, principal: PrincipalLike) -> int:
        return 0


@dataclass
class MemoryFirstSeen:
    """`FirstSeenSource` in a dict (tests; the gateway uses the SQLite quota store)."""

    seen: dict[str, float] = field(default_factory=dict)

    def first_seen(self, key: str, now: float) -> float:
        return self.seen.setdefault(key, now)


class AdaptiveConfig(BaseModel):
    """`traffic.adaptive`: how trust and risk scale per-principal limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warmup_seconds: float = Field(default=0, ge=0, le=90 * 86400)
    new_client_multiplier: float = Field(default=0.5, gt=0, le=1)
    trusted_tenants: dict[str, float] = Field(default_factory=dict)
    trusted_clients: dict[str, float] = Field(default_factory=dict)
    risk_floor: float = Field(default=0.1, ge=MIN_MULTIPLIER, le=1)


def principal_key(p: PrincipalLike) -> str:
    """What identifies a principal for trust: its client (per issuer) or credential."""
    return p.limit_key or p.client_id or p.credential_id


class TrustPolicy:
    """The configured `TrustSignal`: warm-up x partner x risk (see the module doc)."""

    def __init__(self, cfg: AdaptiveConfig, *, first_seen: FirstSeenSource | None = None,
                 risk: RiskProvider | None = None) -> None:
        if cfg.warmup_seconds > 0 and first_seen is None:
            raise ValueError("a warm-up needs a first-seen source")
        self._cfg = cfg
        self._first_seen = first_seen
        self._risk: RiskProvider = risk or NoRisk()
        for name, m in (*cfg.trusted_tenants.items(), *cfg.trusted_clients.items()):
            if not MIN_MULTIPLIER <= m <= MAX_MULTIPLIER:
                raise ValueError(f"multiplier for {name!r} outside [{MIN_MULTIPLIER}, {MAX_MULTIPLIER}]")

    def multiplier(self, principal: PrincipalLike, now: float) -> float:
        cfg = self._cfg
        partner = None
        if principal.client_id is not None:
            partner = cfg.trusted_clients.get(principal.client_id)
        if partner is None:
            partner = cfg.trusted_tenants.get(principal.tenant)
        m = 1.0
        if partner is not None:
            m = partner
        elif cfg.warmup_seconds > 0 and self._first_seen is not None:
            age = now - self._first_seen.first_seen(principal_key(principal), now)
            if age < cfg.warmup_seconds:
                f0 = cfg.new_client_multiplier
                m = f0 + (1.0 - f0) * max(0.0, age) / cfg.warmup_seconds
        score = self._risk.risk(principal)
        if score > 0:
            score = min(100, score)
            m *= 1.0 - (1.0 - cfg.risk_floor) * score / 100.0
        return min(MAX_MULTIPLIER, max(MIN_MULTIPLIER, m))


def scale(spec: RateLimitSpec, m: float) -> RateLimitSpec:
    """`spec` with rate and burst scaled by `m` (each at least 1); `spec` itself at 1.0."""
    if m == 1.0:
        return spec
    return RateLimitSpec(max(1, round(spec.requests * m)), spec.per_seconds, max(1, round(spec.burst * m)))
