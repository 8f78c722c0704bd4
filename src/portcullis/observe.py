"""Prometheus metrics (on their own loopback listener) and structured JSON logs."""

from __future__ import annotations

import logging
import sys
import time
from typing import ClassVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from portcullis.exchange import Exchange


class Metrics:
    """The gateway's metrics, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("portcullis_requests", "Requests by route, status class and decision",
                                ["route", "status", "decision"], registry=self.registry)
        self.denials = Counter("portcullis_denials", "Refusals by reason code", ["reason"],
                               registry=self.registry)
        self.latency = Histogram("portcullis_request_seconds", "Time in the gateway, end to end",
                                 ["route"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1.0, 2.5, 5.0, 10.0))
        self.audit_backlog = Gauge("portcullis_audit_backlog", "Audit events not yet durable",
                                   registry=self.registry)
        self.audit_durable = Gauge("portcullis_audit_durable_events", "Audit events made durable",
                                   registry=self.registry)
        self.info = Gauge("portcullis_build_info", "Build information", ["version"], registry=self.registry)


class MetricsStage:
    """A completion stage that counts every exchange."""

    name: ClassVar[str] = "metrics"

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._children: dict[tuple[str, str, str], Counter] = {}

    def on_complete(self, ex: Exchange) -> None:
        route = ex.route.name if ex.route else "-"
        key = (route, f"{ex.status // 100}xx", ex.decision)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._m.requests.labels(*key)
        child.inc()
        if ex.decision != "allow":
            self._m.denials.labels(ex.reason).inc()
        self._m.latency.labels(route).observe(time.perf_counter() - ex.started)


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
