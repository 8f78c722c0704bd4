"""Prometheus metrics (on their own loopback listener) and structured JSON logs."""

from __future__ import annotations

import bisect
import logging
import sys
import time
from collections.abc import Iterable
from typing import ClassVar, Protocol

import structlog
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from portcullis.exchange import Exchange


class PolicyStats(Protocol):
    """What `PolicyCounters` reads of the policy engine."""

    hits: int
    shape_hits: int
    evaluations: int

    @property
    def generation(self) -> int: ...

    @property
    def shapes(self) -> bool: ...


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestCounters(Collector):
    """Per-request counts kept in plain dicts, turned into Prometheus families at scrape.

    The request path only increments integers on the event loop (no locks, unlike
    prometheus_client's Counter and Histogram, which cost microseconds per call); the
    scrape thread copies the dicts (an atomic operation under the GIL) and renders them.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.denials: dict[str, int] = {}
        # route -> [bucket counts..., +Inf count], and route -> sum of seconds
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}

    def collect(self) -> Iterable[Metric]:
        req = CounterMetricFamily("portcullis_requests", "Requests by route, status class and decision",
                                  labels=["route", "status", "decision"])
        for labels, n in self.requests.copy().items():
            req.add_metric(list(labels), n)
        den = CounterMetricFamily("portcullis_denials", "Refusals by reason code", labels=["reason"])
        for reason, n in self.denials.copy().items():
            den.add_metric([reason], n)
        lat = HistogramMetricFamily("portcullis_request_seconds", "Time in the gateway, end to end",
                                    labels=["route"])
        sums = self.latency_sum.copy()
        for route, live in self.latency.copy().items():
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), list(live), strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            lat.add_metric([route], buckets, sums.get(route, 0.0))
        return [req, den, lat]


class PolicyCounters(Collector):
    """The policy engine's counters, read at scrape time (`PolicyEngine.hits`...)."""

    def __init__(self, engine: PolicyStats) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        e = self._engine
        dec = CounterMetricFamily("portcullis_policy_decisions",
                                  "Policy decisions by what answered: the decision cache (by the whole input "
                                  "or by shape) or a Cedar evaluation", labels=["source"])
        dec.add_metric(["cache_input"], e.hits - e.shape_hits)
        dec.add_metric(["cache_shape"], e.shape_hits)
        dec.add_metric(["cedar"], e.evaluations)
        gen = GaugeMetricFamily("portcullis_policy_generation", "The loaded policy set's generation")
        gen.add_metric([], e.generation)
        shp = GaugeMetricFamily("portcullis_policy_shapes", "1 when the decision cache keys by shape")
        shp.add_metric([], 1 if e.shapes else 0)
        return [dec, gen, shp]


class Metrics:
    """The gateway's metrics, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counters = RequestCounters()
        self.registry.register(self.counters)
        self.audit_backlog = Gauge("portcullis_audit_backlog", "Audit events not yet durable",
                                   registry=self.registry)
        self.audit_durable = Gauge("portcullis_audit_durable_events", "Audit events made durable",
                                   registry=self.registry)
        self.info = Gauge("portcullis_build_info", "Build information", ["version"], registry=self.registry)


class MetricsStage:
    """A completion stage that counts every exchange."""

    name: ClassVar[str] = "metrics"

    def __init__(self, metrics: Metrics) -> None:
        self._c = metrics.counters

    def on_complete(self, ex: Exchange) -> None:
        c = self._c
        route = ex.route.name if ex.route else "-"
        key = (route, f"{ex.status // 100}xx", ex.decision)
        c.requests[key] = c.requests.get(key, 0) + 1
        if ex.decision != "allow":
            c.denials[ex.reason] = c.denials.get(ex.reason, 0) + 1
        elapsed = time.perf_counter() - ex.started
        counts = c.latency.get(route)
        if counts is None:
            counts = c.latency[route] = [0] * (len(LATENCY_BUCKETS) + 1)
        counts[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        c.latency_sum[route] = c.latency_sum.get(route, 0.0) + elapsed


def configure_logging(level: str = "info", json_logs: bool = True) -> None:
    """JSON lines on stderr through structlog; stdlib loggers go through the same renderer.

    Nothing logs secrets: stages log reason codes and exception types, never
    credentials, bodies or full headers.
    """
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    )
    pre: list[structlog.types.Processor] = [
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=pre,
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*pre, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
