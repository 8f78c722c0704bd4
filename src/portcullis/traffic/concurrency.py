"""Concurrency limits per upstream and per tenant, adaptive per upstream.

A request holds a `Slot` from the moment it is admitted until its exchange is over
(response streamed, refused, failed or abandoned); `ConcurrencyLimiter.release` is
idempotent. Admission is all or nothing: a request refused by one limit holds no
slot of another.

Three limits, each optional:

- per upstream: at most `max_concurrency` in flight; with `adaptive`, the limit
  follows the upstream's latency (`GradientController`, below);
- per tenant on an upstream (`tenant_share`): one tenant may hold at most that share
  of the upstream's *current* limit (at least one slot), so a tenant flooding a slow
  upstream leaves room for the others even as the adaptive limit shrinks;
- per tenant across upstreams (`per_tenant`, `tenants`): a flat cap.

Adaptive concurrency follows Envoy's gradient controller
(envoy.extensions.filters.http.adaptive_concurrency.v3): every `sample_window_seconds`
the latencies of completed requests are summarized by a percentile (sampleRTT) and
compared with the lowest such value seen over `min_rtt_window_seconds` (minRTT):

    gradient  = clamp((minRTT x (1 + buffer)) / sampleRTT, 0.5, 2.0)
    new limit = clamp(gradient x limit + sqrt(gradient x limit), min_limit, max_concurrency)

When the upstream slows, sampleRTT rises past minRTT and the limit shrinks (halving
at most per window); when it recovers, the gradient is above 1 and the limit grows
back. Envoy re-measures minRTT by pinning the limit low for a while; here minRTT is
the minimum over a sliding window of past windows, which needs no pinning and lets a
permanently slower upstream set a new baseline once the window has passed.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

_K = TypeVar("_K")


class AdaptiveConcurrencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_window_seconds: float = Field(default=0.25, gt=0, le=60)
    min_rtt_window_seconds: float = Field(default=60, gt=0, le=3600)
    percentile: float = Field(default=0.9, gt=0, le=1)
    buffer: float = Field(default=0.25, ge=0, le=10)
    min_limit: int = Field(default=2, ge=1, le=100_000)
    max_samples: int = Field(default=10_000, ge=10, le=1_000_000)


class UpstreamConcurrencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int = Field(ge=1, le=1_000_000)
    adaptive: AdaptiveConcurrencyConfig | None = None
    tenant_share: float | None = Field(default=None, gt=0, le=1)


class ConcurrencyConfig(BaseModel):
    """`traffic.concurrency`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upstreams: dict[str, UpstreamConcurrencyConfig] = Field(default_factory=dict)
    per_tenant: int | None = Field(default=None, ge=1, le=1_000_000)
    tenants: dict[str, int] = Field(default_factory=dict)
    retry_after_seconds: int = Field(default=1, ge=1, le=3600)

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams or self.per_tenant is not None or self.tenants)


class GradientController:
    """The adaptive limit of one upstream (see the module doc). Single event loop."""

    def __init__(self, cfg: AdaptiveConcurrencyConfig, max_limit: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._max = max_limit
        self._min = min(cfg.min_limit, max_limit)
        self._clock = clock
        self.limit: float = float(max_limit)
        self._samples: list[float] = []
        self._window_end = clock() + cfg.sample_window_seconds
        # (window end, sampleRTT) of recent windows, for the sliding minRTT.
        self._history: deque[tuple[float, float]] = deque()
        self.min_rtt: float | None = None
        self.sample_rtt: float | None = None

    @property
    def current(self) -> int:
        return max(self._min, int(self.limit))

    def record(self, latency: float) -> None:
        """One completed request's latency (seconds); may close the sample window."""
        if len(self._samples) < self._cfg.max_samples:
            self._samples.append(latency)
        now = self._clock()
        if now >= self._window_end:
            self._update(now)

    def _update(self, now: float) -> None:
        cfg = self._cfg
        self._window_end = now + cfg.sample_window_seconds
        samples, self._samples = self._samples, []
        if not samples:
            return
        samples.sort()
        sample = samples[min(len(samples) - 1, math.ceil(cfg.percentile * len(samples)) - 1)]
        sample = max(sample, 1e-6)
        self.sample_rtt = sample
        history = self._history
        history.append((now, sample))
        while history and history[0][0] < now - cfg.min_rtt_window_seconds:
            history.popleft()
        self.min_rtt = min(s for _, s in history)
        gradient = min(2.0, max(0.5, self.min_rtt * (1.0 + cfg.buffer) / sample))
        scaled = gradient * self.limit
        self.limit = float(min(self._max, max(self._min, scaled + math.sqrt(scaled))))


@dataclass(slots=True)
class Slot:
    """A held admission; give it back with `ConcurrencyLimiter.release`."""

    upstream: str
    tenant: str | None
    started: float
    upstream_held: bool
    tenant_held: bool
    released: bool = False


@dataclass(frozen=True, slots=True)
class Shed:
    """A refusal: which limit (``upstream`` / ``tenant_share`` / ``tenant``) and when to retry."""

    limit: str
    retry_after: int


class ConcurrencyLimiter:
    """In-flight counts per upstream, per (upstream, tenant) and per tenant."""

    def __init__(self, cfg: ConcurrencyConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._clock = clock
        self._up_cfg = dict(cfg.upstreams)
        self.controllers = {name: GradientController(u.adaptive, u.max_concurrency, clock)
                            for name, u in cfg.upstreams.items() if u.adaptive is not None}
        self.in_flight: dict[str, int] = {}
        self._per_up_tenant: dict[tuple[str, str], int] = {}
        self._per_tenant: dict[str, int] = {}

    def limit_of(self, upstream: str) -> int | None:
        """The upstream's current limit (None: unlimited)."""
        c = self.controllers.get(upstream)
        if c is not None:
            return c.current
        u = self._up_cfg.get(upstream)
        return u.max_concurrency if u is not None else None

    def tenant_in_flight(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def acquire(self, upstream: str, tenant: str | None) -> Slot | Shed:
        """Admit one request to `upstream` for `tenant` (None: no tenant, e.g. public)."""
        ucfg = self._up_cfg.get(upstream)
        limit = self.limit_of(upstream)
        if limit is not None and self.in_flight.get(upstream, 0) >= limit:
            return Shed("upstream", self._retry_after(upstream))
        tenant_cap = None
        if tenant is not None:
            tenant_cap = self._cfg.tenants.get(tenant, self._cfg.per_tenant)
            if ucfg is not None and ucfg.tenant_share is not None and limit is not None:
                share = max(1, int(ucfg.tenant_share * limit))
                if self._per_up_tenant.get((upstream, tenant), 0) >= share:
                    return Shed("tenant_share", self._retry_after(upstream))
            if tenant_cap is not None and self._per_tenant.get(tenant, 0) >= tenant_cap:
                return Shed("tenant", self._retry_after(upstream))
        up_held = ucfg is not None
        if up_held:
            self.in_flight[upstream] = self.in_flight.get(upstream, 0) + 1
        tenant_held = tenant is not None and (up_held or tenant_cap is not None)
        if tenant is not None and tenant_held:
            k = (upstream, tenant)
            self._per_up_tenant[k] = self._per_up_tenant.get(k, 0) + 1
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        return Slot(upstream, tenant, self._clock(), up_held, tenant_held)

    def release(self, slot: Slot, latency: float | None = None) -> None:
        """Give the slot back (again: no effect); `latency` feeds the adaptive limit."""
        if slot.released:
            return
        slot.released = True
        if slot.upstream_held:
            _decrement(self.in_flight, slot.upstream)
        if slot.tenant_held and slot.tenant is not None:
            _decrement(self._per_up_tenant, (slot.upstream, slot.tenant))
            _decrement(self._per_tenant, slot.tenant)
        if latency is not None:
            c = self.controllers.get(slot.upstream)
            if c is not None:
                c.record(latency)

    def _retry_after(self, upstream: str) -> int:
        c = self.controllers.get(upstream)
        base = self._cfg.retry_after_seconds
        if c is not None and c.sample_rtt is not None:
            return max(base, math.ceil(c.sample_rtt))
        return base


def _decrement(d: dict[_K, int], k: _K) -> None:
    n = d.get(k, 0) - 1
    if n > 0:
        d[k] = n
    else:
        d.pop(k, None)
