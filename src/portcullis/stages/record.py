"""record: one audit event per call (DESIGN.md, request path step 10).

The event is handed to the group-commit `AuditWriter`, which never blocks the request
path. If the writer's backlog is full — the audit store cannot keep up or is down —
new requests are refused with 503 rather than served unaudited (fail closed).
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from portcullis.audit.events import AuditEvent
from portcullis.audit.writer import AuditWriter
from portcullis.exchange import Exchange
from portcullis.problems import Problem

log = logging.getLogger("portcullis.audit")
_EXTRA_FACTS = ("oauth", "forward_auth", "policy", "rate_limit", "retries", "response_too_large", "upstream_body_error",
                "client_disconnected", "tls")


class RecordStage:
    """Admission check on the way in; the audit event once the exchange is over."""

    name: ClassVar[str] = "record"

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer
        self._refusing = False

    async def on_request(self, ex: Exchange) -> Problem | None:
        if self._writer.backlog >= self._writer.max_backlog:
            if not self._refusing:
                log.error("audit backlog full (%d events): refusing requests", self._writer.backlog)
                self._refusing = True
            ex.facts["unaudited"] = True
            return Problem(503, "service-unavailable", "audit.backlog_full",
                           "The gateway cannot record requests right now; retry shortly.",
                           headers=[(b"retry-after", b"1")])
        self._refusing = False
        return None

    def on_complete(self, ex: Exchange) -> None:
        if ex.facts.get("unaudited"):
            return
        p = ex.principal
        route = ex.route
        extra = {k: ex.facts[k] for k in _EXTRA_FACTS if k in ex.facts}
        event = AuditEvent(
            ts=ex.started_wall,
            kind="request",
            request_id=ex.request_id,
            decision=ex.decision,
            reason=ex.reason,
            method=ex.method,
            host=ex.host[:255],
            path=ex.path[:2048] if ex.path else ex.raw_path[:2048].decode("ascii", "replace"),
            route=route.name if route else "",
            status=ex.status,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
            latency_ms=(time.perf_counter() - ex.started) * 1000.0,
            client_ip=ex.client_ip,
            user_agent=ex.user_agent,
            subject=p.subject if p else "",
            tenant=p.tenant if p else "",
            credential_id=p.credential_id if p else str(ex.facts.get("credential_id", "")),
            credential_kind=p.credential_kind if p else "",
            client_id=(p.client_id or "") if p else "",
            extra=extra,
        )
        if not self._writer.submit(event):
            log.error("audit event dropped: backlog full (request %s)", ex.request_id)
