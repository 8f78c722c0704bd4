"""Break-glass: no approval, strictly time-bound, always raises an alert."""

from __future__ import annotations

import logging

import pytest

from portcullis.governance import Alert, ForbiddenError, Governance, InvalidRequestError
from tests.unit.governance.conftest import Clock, GovFactory, MemoryAudit


def test_break_glass_works_without_approval_and_alerts(make_gov: GovFactory, clock: Clock, audit: MemoryAudit,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Alert] = []
    gov = make_gov(break_glass_max_seconds=1800, alerts=[seen.append])
    with caplog.at_level(logging.ERROR, logger="portcullis.governance"):
        a = gov.break_glass("acme", "u9", "dba", duration=900, actor="oncall", reason="INC-42 database down")
    assert a.kind == "break_glass" and a.approved_by is None and a.expires_at == clock.now + 900
    assert gov.active_roles("acme", "u9") == {"dba"}
    assert gov.requests() == []  # nothing waited for anyone
    admin_ev, alert_ev = audit.events
    assert (admin_ev.kind, admin_ev.reason, admin_ev.subject) == ("admin", "governance.break_glass", "oncall")
    assert (alert_ev.kind, alert_ev.reason) == ("alert", "governance.break_glass")
    assert alert_ev.extra["assignment_id"] == a.id and alert_ev.extra["break_glass_reason"] == "INC-42 database down"
    (alert,) = seen
    assert (alert.kind, alert.actor, alert.principal, alert.role, alert.tenant) == (
        "governance.break_glass", "oncall", "u9", "dba", "acme")
    assert alert.expires_at == a.expires_at and alert.assignment_id == a.id
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "break-glass" in errors[0].getMessage() and a.id in errors[0].getMessage()


def test_break_glass_is_time_bound(make_gov: GovFactory, clock: Clock) -> None:
    gov = make_gov(break_glass_max_seconds=1800, cache_seconds=60)
    with pytest.raises(InvalidRequestError) as info:
        gov.break_glass("acme", "u9", "dba", duration=1801, actor="oncall", reason="x")
    assert info.value.reason == "governance.duration_exceeds_max"
    assert gov.active_roles("acme", "u9") == frozenset()
    gov.break_glass("acme", "u9", "dba", duration=1800, actor="oncall", reason="x")
    clock.advance(1799)
    assert gov.active_roles("acme", "u9") == {"dba"}
    clock.advance(1)
    assert gov.active_roles("acme", "u9") == frozenset()


def test_break_glass_refusals_are_audited(gov: Governance, audit: MemoryAudit) -> None:
    with pytest.raises(ForbiddenError) as info:
        gov.break_glass("acme", "u9", "dba", duration=60, actor="mallory", reason="trust me")
    assert info.value.reason == "governance.not_break_glass_actor"
    with pytest.raises(InvalidRequestError):
        gov.break_glass("acme", "u9", "dba", duration=60, actor="oncall", reason="")  # reason required
    assert gov.assignments() == []
    denied = [e for e in audit.events if e.decision == "deny"]
    assert [e.reason for e in denied] == ["governance.not_break_glass_actor", "governance.invalid"]
    assert denied[0].subject == "mallory" and denied[0].extra["action"] == "break_glass"
    assert all(e.kind != "alert" for e in audit.events)


def test_approvers_may_break_glass(gov: Governance) -> None:
    gov.break_glass("acme", "u9", "dba", duration=60, actor="alice", reason="x")
    assert gov.active_roles("acme", "u9") == {"dba"}


def test_break_glass_cannot_grant_approver_role(make_gov: GovFactory) -> None:
    gov = make_gov(approver_role="access-admin", approver_tenant="platform")
    with pytest.raises(ForbiddenError) as info:
        gov.break_glass("platform", "oncall", "access-admin", duration=60, actor="oncall", reason="bootstrap")
    assert info.value.reason == "governance.forbidden_role"
    assert not gov.may_approve("oncall")


def test_failing_alert_hook_does_not_undo_the_grant(make_gov: GovFactory, audit: MemoryAudit) -> None:
    def broken(_: Alert) -> None:
        raise RuntimeError("webhook down")

    seen: list[Alert] = []
    gov = make_gov(alerts=[broken, seen.append])
    a = gov.break_glass("acme", "u9", "dba", duration=60, actor="oncall", reason="x")
    assert gov.active_roles("acme", "u9") == {"dba"}
    assert [s.assignment_id for s in seen] == [a.id]  # later hooks still run
    assert audit.of("governance.break_glass")


def test_break_glass_refused_when_audit_unusable(gov: Governance, audit: MemoryAudit) -> None:
    audit.fail = True
    with pytest.raises(OSError):
        gov.break_glass("acme", "u9", "dba", duration=60, actor="oncall", reason="x")
    audit.fail = False
    assert gov.assignments() == []
    assert gov.active_roles("acme", "u9") == frozenset()


def test_grantor_may_end_break_glass_early(gov: Governance) -> None:
    a = gov.break_glass("acme", "u9", "dba", duration=600, actor="oncall", reason="x")
    gov.revoke(a.id, "oncall", "resolved")
    assert gov.active_roles("acme", "u9") == frozenset()
