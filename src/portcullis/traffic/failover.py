"""What happens when the shared backend (Redis) is down or slow, per concern.

DESIGN.md: fail closed, with one exception: a rate-limit backend outage may be
configured to fail open to per-node local limits, with an alert.

- limits (`FailoverRateBackend`, `FailoverQuota`): ``closed`` re-raises
  `BackendUnavailable` (the limit stage answers 503); ``open`` decides with a local
  in-process backend, each node enforcing ``1/nodes`` of every limit, and alerts.
- replay caches (`FailClosedReplayCache`): always closed. A replay check that cannot
  be made raises `BackendUnavailable` and the credential is refused: authentication
  never fails open, and a node-local cache would let a value replayed on another node
  through.
- revocation fan-out (`FailoverRevocationBus`): a publish that cannot reach Redis still
  tells this node's listeners at once and alerts; other nodes learn of the revocation by
  polling the store, which stays the source of truth.

Each concern has a circuit: after a failure Redis is not asked again for
`probe_interval` seconds (requests take the failure path at once rather than each
waiting out a timeout); then one request probes it, and a success ends the outage
(logged, and `FailoverAlerts` notified) — recovery needs no restart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig, RedisFailureConfig
from portcullis.traffic.gcra import Decision
from portcullis.traffic.ledger import LedgeredQuota, QuotaLedger
from portcullis.traffic.memory import MemoryRateBackend
from portcullis.traffic.protocols import (
    BackendUnavailable,
    LimitCheck,
    QuotaBackend,
    QuotaDecision,
    RateBackend,
    ReplayCache,
    RevocationBus,
    RevocationListener,
)
from portcullis.traffic.redis_backend import RedisBackends

log = logging.getLogger("portcullis.traffic.failover")

Concern = Literal["limits", "quotas", "replay", "revocations"]


@dataclass(frozen=True, slots=True)
class OutageEvent:
    """An outage began (`down=True`) or ended for one concern."""

    concern: Concern
    down: bool
    detail: str  # the failure, or how long the outage lasted; never a secret


class FailoverAlerts:
    """Outage alerts and counters, for logs, metrics and alert hooks.

    `counters` is a plain dict the metrics layer exports as-is:
    ``<concern>.outages`` (outages begun), ``limits.fallback`` / ``quotas.fallback``
    (decisions made locally while failing open), ``limits.refused`` / ``quotas.refused``
    / ``replay.refused`` (requests refused because the backend was unavailable),
    ``revocations.publish_failed``. `down` holds the concerns out right now.
    Callbacks registered with `on_event` run on every transition; one that raises is
    logged and does not stop the others.
    """

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.down: set[Concern] = set()
        self._callbacks: list[Callable[[OutageEvent], None]] = []

    def on_event(self, callback: Callable[[OutageEvent], None]) -> None:
        self._callbacks.append(callback)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def outage(self, concern: Concern, detail: str) -> None:
        self.down.add(concern)
        self.count(f"{concern}.outages")
        log.error("ALERT %s backend unavailable: %s", concern, detail)
        self._emit(OutageEvent(concern, True, detail))

    def recovered(self, concern: Concern, seconds: float) -> None:
        self.down.discard(concern)
        detail = f"back after {seconds:.1f} s"
        log.warning("%s backend recovered (%s)", concern, detail)
        self._emit(OutageEvent(concern, False, detail))

    def _emit(self, event: OutageEvent) -> None:
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception as exc:
                log.error("outage alert callback failed: %s", type(exc).__name__)


class Circuit:
    """Whether to ask the backend now, and outage bookkeeping for one concern."""

    def __init__(self, concern: Concern, alerts: FailoverAlerts, probe_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.concern: Concern = concern
        self._alerts = alerts
        self._probe_interval = probe_interval
        self._clock = clock
        self._down_since: float | None = None
        self._next_probe = 0.0

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def should_try(self) -> bool:
        """True when up, or when down and a probe is due (then only one caller per interval)."""
        if self._down_since is None:
            return True
        now = self._clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self._probe_interval
        return True

    def failed(self, exc: BackendUnavailable) -> None:
        now = self._clock()
        self._next_probe = now + self._probe_interval
        if self._down_since is None:
            self._down_since = now
            self._alerts.outage(self.concern, str(exc))

    def succeeded(self) -> None:
        if self._down_since is not None:
            seconds = self._clock() - self._down_since
            self._down_since = None
            self._alerts.recovered(self.concern, seconds)


def _share(n: int, nodes: int) -> int:
    return max(1, n // nodes)


class FailoverRateBackend:
    """`RateBackend` over a shared backend, with the configured outage behaviour.

    ``closed``: while the shared backend is unavailable, `check_all` raises
    `BackendUnavailable` (the caller refuses with 503). ``open``: it decides with
    `local` (a `MemoryRateBackend` unless given), every limit divided by `nodes` so
    the nodes together stay near the configured rate, counted in ``limits.fallback``.
    """

    def __init__(self, shared: RateBackend, *, mode: Literal["open", "closed"], alerts: FailoverAlerts,
                 nodes: int = 1, probe_interval: float = 1.0, local: RateBackend | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._shared = shared
        self._mode = mode
        self._alerts = alerts
        self._nodes = nodes
        self._local = local if local is not None else MemoryRateBackend(max_keys=100_000)
        self.circuit = Circuit("limits", alerts, probe_interval, clock)
        self._scaled: dict[RateLimitSpec, RateLimitSpec] = {}

    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        if self.circuit.should_try():
            try:
                decisions = await self._shared.check_all(checks)
            except BackendUnavailable as exc:
                self.circuit.failed(exc)
                failure = exc
            else:
                self.circuit.succeeded()
                return decisions
        else:
            failure = BackendUnavailable("rate-limit backend unavailable (waiting to probe it again)")
        if self._mode == "closed":
            self._alerts.count("limits.refused")
            raise failure
        self._alerts.count("limits.fallback")
        return await self._local.check_all([LimitCheck(c.key, self._scale(c.spec), c.cost) for c in checks])

    def _scale(self, spec: RateLimitSpec) -> RateLimitSpec:
        if self._nodes == 1:
            return spec
        got = self._scaled.get(spec)
        if got is None:
            got = RateLimitSpec(_share(spec.requests, self._nodes), spec.per_seconds, _share(spec.burst, self._nodes))
            if len(self._scaled) < 10_000:
                self._scaled[spec] = got
        return got

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()


class LocalQuota:
    """`QuotaBackend` in process memory, for fail-open outages only: it does not
    survive a restart and knows nothing of what other nodes counted. A negative `cost`
    is a refund (never below zero), as with the shared backends."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._used: dict[tuple[str, str], tuple[int, float]] = {}
        self._max_keys = max_keys
        self._clock = clock

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        k = (key, period)
        used = self._used.get(k, (0, resets_at))[0]
        if cost < 0:  # a refund, as the shared backends take it: never below zero
            used = max(0, used + cost)
            if k in self._used:
                self._used[k] = (used, resets_at)
            return QuotaDecision(True, used, limit, resets_at)
        if used + cost > limit:
            return QuotaDecision(False, used, limit, resets_at)
        if k not in self._used and len(self._used) >= self._max_keys:
            now = self._clock()
            for old in [x for x, (_, end) in self._used.items() if end <= now] or list(self._used)[:1]:
                del self._used[old]
        self._used[k] = (used + cost, resets_at)
        return QuotaDecision(True, used + cost, limit, resets_at)

    async def close(self) -> None:
        self._used.clear()


class FailoverQuota:
    """`QuotaBackend` over a shared one, with the same outage behaviour as the limits."""

    def __init__(self, shared: QuotaBackend, *, mode: Literal["open", "closed"], alerts: FailoverAlerts,
                 nodes: int = 1, probe_interval: float = 1.0, local: QuotaBackend | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._shared = shared
        self._mode = mode
        self._alerts = alerts
        self._nodes = nodes
        self._local = local if local is not None else LocalQuota()
        self.circuit = Circuit("quotas", alerts, probe_interval, clock)

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        if self.circuit.should_try():
            try:
                decision = await self._shared.consume(key, period, limit, resets_at, cost)
            except BackendUnavailable as exc:
                self.circuit.failed(exc)
                failure = exc
            else:
                self.circuit.succeeded()
                return decision
        else:
            failure = BackendUnavailable("quota backend unavailable (waiting to probe it again)")
        if self._mode == "closed":
            self._alerts.count("quotas.refused")
            raise failure
        self._alerts.count("quotas.fallback")
        local_limit = limit if self._nodes == 1 else max(1, math.floor(limit / self._nodes))
        got = await self._local.consume(key, period, local_limit, resets_at, cost)
        return QuotaDecision(got.allowed, got.used, limit, got.resets_at)

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()


class FailClosedReplayCache:
    """`ReplayCache` that never fails open: while the shared cache is unavailable every
    `first_use` raises `BackendUnavailable`, and the caller must refuse the credential
    (counted in ``replay.refused``). It never answers True without the shared cache
    having recorded the value."""

    def __init__(self, shared: ReplayCache, *, alerts: FailoverAlerts, probe_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._shared = shared
        self._alerts = alerts
        self.circuit = Circuit("replay", alerts, probe_interval, clock)

    async def first_use(self, namespace: str, value: str, ttl_seconds: float) -> bool:
        if self.circuit.should_try():
            try:
                fresh = await self._shared.first_use(namespace, value, ttl_seconds)
            except BackendUnavailable as exc:
                self.circuit.failed(exc)
                self._alerts.count("replay.refused")
                raise
            self.circuit.succeeded()
            return fresh
        self._alerts.count("replay.refused")
        raise BackendUnavailable("replay cache unavailable: the credential cannot be checked for replay")

    async def close(self) -> None:
        await self._shared.close()


class FailoverRevocationBus:
    """`RevocationBus` whose `publish` never fails: if the shared bus cannot be reached,
    this node's listeners are called directly and an alert is raised; other nodes then
    notice the change by polling the revocation store."""

    def __init__(self, shared: RevocationBus, *, alerts: FailoverAlerts) -> None:
        self._shared = shared
        self._alerts = alerts
        self._local: list[RevocationListener] = []
        self._down = False

    def subscribe(self, listener: RevocationListener) -> None:
        self._local.append(listener)
        self._shared.subscribe(listener)

    async def publish(self) -> None:
        try:
            await self._shared.publish()
        except BackendUnavailable as exc:
            self._alerts.count("revocations.publish_failed")
            if not self._down:
                self._down = True
                self._alerts.outage("revocations", str(exc))
            for listener in list(self._local):
                try:
                    result = listener()
                    if result is not None:
                        await result
                except Exception as err:  # one failing listener must not silence the rest
                    log.error("revocation listener failed: %s", type(err).__name__)
            return
        if self._down:
            self._down = False
            self._alerts.recovered("revocations", 0.0)

    async def close(self) -> None:
        await self._shared.close()


@dataclass
class SharedTraffic:
    """The Redis backends of one node wrapped in the configured failure behaviour.

    What the gateway wires in when the config has ``redis:``; `alerts` carries the
    outage counters and hooks."""

    rates: FailoverRateBackend
    quotas: FailoverQuota
    replay: FailClosedReplayCache
    revocations: FailoverRevocationBus
    alerts: FailoverAlerts
    backends: RedisBackends
    ledgered: LedgeredQuota | None = None

    @classmethod
    def open(cls, cfg: RedisConfig, *, alerts: FailoverAlerts | None = None, ledger: QuotaLedger | None = None,
             ledger_flush_seconds: float = 1.0) -> SharedTraffic:
        """Build from config (no I/O: connections open on first use). With a `ledger`
        (a shared database), quota counts are also kept there (`portcullis.traffic.ledger`)."""
        return cls.wrap(RedisBackends.open(cfg), cfg.on_failure, alerts=alerts, ledger=ledger,
                        ledger_flush_seconds=ledger_flush_seconds)

    @classmethod
    def wrap(cls, backends: RedisBackends, on_failure: RedisFailureConfig, *,
             alerts: FailoverAlerts | None = None, ledger: QuotaLedger | None = None,
             ledger_flush_seconds: float = 1.0) -> SharedTraffic:
        alerts = alerts if alerts is not None else FailoverAlerts()
        probe = on_failure.probe_interval_ms / 1000
        mode = on_failure.limits
        quotas: QuotaBackend = backends.quotas
        ledgered = None
        if ledger is not None:
            quotas = ledgered = LedgeredQuota(backends.quotas, ledger, flush_seconds=ledger_flush_seconds)
        return cls(
            rates=FailoverRateBackend(backends.rates, mode=mode, alerts=alerts, nodes=on_failure.nodes,
                                      probe_interval=probe),
            quotas=FailoverQuota(quotas, mode=mode, alerts=alerts, nodes=on_failure.nodes,
                                 probe_interval=probe),
            replay=FailClosedReplayCache(backends.replay, alerts=alerts, probe_interval=probe),
            revocations=FailoverRevocationBus(backends.revocations, alerts=alerts),
            alerts=alerts,
            backends=backends,
            ledgered=ledgered,
        )

    def start(self) -> None:
        """Begin the background work (the quota ledger's flushes); inside the running loop."""
        if self.ledgered is not None:
            self.ledgered.start()

    async def close(self) -> None:
        if self.ledgered is not None:
            await self.ledgered.close()  # its last flush needs Redis no more, but comes first
        await self.backends.close()
