"""Four eyes: a change applies only when a second, authorized admin approves it; the
requester and the beneficiary cannot; every step and every refusal is audited."""

from __future__ import annotations

import pytest

from portcullis.governance import (
    ConflictError,
    ForbiddenError,
    Governance,
    InvalidRequestError,
    NotFoundError,
)
from tests.unit.governance.conftest import Clock, GovFactory, MemoryAudit


def test_self_approval_refused_and_audited(gov: Governance, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice", reason="new team lead")
    with pytest.raises(ForbiddenError) as info:
        gov.approve(req.id, "alice")
    assert info.value.reason == "governance.self_approval"
    assert gov.get_request(req.id).status == "pending"
    assert gov.active_roles("acme", "u1") == frozenset()
    denied = audit.of("governance.self_approval")
    assert len(denied) == 1
    assert denied[0].decision == "deny" and denied[0].subject == "alice"
    assert denied[0].extra["change_id"] == req.id


def test_second_admin_approves_and_both_steps_are_audited(gov: Governance, audit: MemoryAudit,
                                                          clock: Clock) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice", reason="new team lead")
    assert gov.active_roles("acme", "u1") == frozenset()
    clock.advance(60)
    done = gov.approve(req.id, "bob")
    assert done.status == "applied" and done.decided_by == "bob" and done.decided_at == clock.now
    assert gov.active_roles("acme", "u1") == {"admin"}
    assert gov.active_roles("globex", "u1") == frozenset()  # roles are per tenant
    (a,) = gov.assignments(active_only=True)
    assert (a.kind, a.granted_by, a.approved_by, a.request_id, a.expires_at) == ("standing", "alice", "bob",
                                                                                 req.id, None)
    assert audit.reasons() == ["governance.requested", "governance.approved", "governance.applied"]
    requested, approved, applied = audit.events
    assert requested.subject == "alice" and requested.extra["requested_by"] == "alice"
    assert approved.subject == "bob" and approved.extra["requested_by"] == "alice"
    assert approved.extra["approved_by"] == "bob"
    assert applied.extra["assignment_id"] == a.id and applied.tenant == "acme"
    assert all(e.kind == "admin" and e.decision == "allow" for e in audit.events)


def test_beneficiary_cannot_approve_own_elevation(gov: Governance, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "bob", "admin", "alice")
    with pytest.raises(ForbiddenError) as info:
        gov.approve(req.id, "bob")
    assert info.value.reason == "governance.self_approval"
    assert gov.active_roles("acme", "bob") == frozenset()
    gov.approve(req.id, "carol")
    assert gov.active_roles("acme", "bob") == {"admin"}


def test_non_approver_refused(gov: Governance, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice")
    with pytest.raises(ForbiddenError) as info:
        gov.approve(req.id, "mallory")
    assert info.value.reason == "governance.not_approver"
    assert audit.of("governance.not_approver")[0].subject == "mallory"
    assert gov.get_request(req.id).status == "pending"


def test_no_approvers_configured_fails_closed(make_gov: GovFactory) -> None:
    gov = make_gov(approvers=())
    req = gov.request_role("acme", "u1", "admin", "alice")
    for who in ("bob", "carol"):
        with pytest.raises(ForbiddenError):
            gov.approve(req.id, who)


def test_approver_role_grants_and_loses_approval_right(make_gov: GovFactory) -> None:
    gov = make_gov(approvers=("alice", "bob"), approver_role="access-admin", approver_tenant="platform")
    grant = gov.request_role("platform", "dave", "access-admin", "alice")
    gov.approve(grant.id, "bob")
    assert gov.may_approve("dave")
    req = gov.request_role("acme", "u1", "admin", "alice")
    gov.approve(req.id, "dave")  # dave approves by holding the role
    assert gov.active_roles("acme", "u1") == {"admin"}
    (dave,) = [a for a in gov.assignments(active_only=True) if a.principal == "dave"]
    gov.revoke(dave.id, "alice")
    # The right is checked against the store, not a cache: gone at once.
    other = gov.request_role("acme", "u2", "admin", "alice")
    with pytest.raises(ForbiddenError):
        gov.approve(other.id, "dave")


def test_approve_twice_and_after_reject(gov: Governance) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice")
    gov.approve(req.id, "bob")
    with pytest.raises(ConflictError) as info:
        gov.approve(req.id, "carol")
    assert info.value.reason == "governance.not_pending"
    assert len(gov.assignments()) == 1
    req2 = gov.request_role("acme", "u2", "admin", "alice")
    gov.reject(req2.id, "bob", "not needed")
    with pytest.raises(ConflictError):
        gov.approve(req2.id, "carol")
    assert gov.active_roles("acme", "u2") == frozenset()


def test_reject_rules(gov: Governance, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice")
    with pytest.raises(ForbiddenError):
        gov.reject(req.id, "mallory")  # a bystander cannot kill requests
    withdrawn = gov.reject(req.id, "alice", "typo")  # the requester may withdraw
    assert (withdrawn.status, withdrawn.decided_by, withdrawn.decision_reason) == ("rejected", "alice", "typo")
    req2 = gov.request_role("acme", "u1", "admin", "alice")
    assert gov.reject(req2.id, "bob").status == "rejected"
    assert [e.extra["rejected_by"] for e in audit.of("governance.rejected")] == ["alice", "bob"]


def test_unknown_and_malformed_ids(gov: Governance) -> None:
    with pytest.raises(NotFoundError):
        gov.approve("req_000000000000", "bob")
    for bad in ("req_zzz", "' OR 1=1 --", "", "req_000000000000\n"):
        with pytest.raises(InvalidRequestError):
            gov.approve(bad, "bob")
    with pytest.raises(InvalidRequestError):
        gov.revoke("ra_../../x", "bob")


@pytest.mark.parametrize(("field", "value"), [
    ("tenant", "acme corp"), ("tenant", "../x"), ("tenant", ""), ("principal", "u\n1"), ("principal", "x" * 257),
    ("role", "admin;drop"), ("role", ""),
])
def test_invalid_role_payloads_refused(gov: Governance, field: str, value: str) -> None:
    args = {"tenant": "acme", "principal": "u1", "role": "admin", field: value}
    with pytest.raises(InvalidRequestError):
        gov.request_role(args["tenant"], args["principal"], args["role"], "alice")
    assert gov.requests() == []


def test_generic_request_refuses_unknown_kinds_and_fields(gov: Governance) -> None:
    with pytest.raises(InvalidRequestError):
        gov.request("grant_everything", {}, "alice")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        gov.request("role_assignment", {"tenant": "acme", "principal": "u1", "role": "r", "expires_at": 1},
                    "alice")
    with pytest.raises(InvalidRequestError):
        gov.request_role("acme", "u1", "admin", "alice", reason="line\nbreak")
    with pytest.raises(InvalidRequestError):
        gov.request_role("acme", "u1", "admin", "not an admin name")


def test_already_held_and_removal(gov: Governance, audit: MemoryAudit) -> None:
    gov.approve(gov.request_role("acme", "u1", "admin", "alice").id, "bob")
    with pytest.raises(ConflictError) as info:
        gov.request_role("acme", "u1", "admin", "alice")
    assert info.value.reason == "governance.already_held"
    with pytest.raises(ConflictError):
        gov.request_removal("acme", "u1", "viewer", "alice")  # nothing to remove
    removal = gov.request_removal("acme", "u1", "admin", "alice", reason="left the team")
    assert gov.active_roles("acme", "u1") == {"admin"}  # not before approval
    with pytest.raises(ForbiddenError):
        gov.approve(removal.id, "alice")
    gov.approve(removal.id, "carol")
    assert gov.active_roles("acme", "u1") == frozenset()
    (a,) = gov.assignments()
    assert a.revoked_by == "carol"
    assert audit.of("governance.applied")[-1].extra["revoked"] == [a.id]


def test_removal_goes_stale_when_role_already_gone(gov: Governance) -> None:
    gov.approve(gov.request_role("acme", "u1", "admin", "alice").id, "bob")
    removal = gov.request_removal("acme", "u1", "admin", "alice")
    (a,) = gov.assignments(active_only=True)
    gov.revoke(a.id, "bob")
    with pytest.raises(ConflictError) as info:
        gov.approve(removal.id, "carol")
    assert info.value.reason == "governance.stale"
    assert gov.get_request(removal.id).status == "rejected"


def test_no_change_without_its_audit_event(gov: Governance, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice")
    audit.fail = True
    with pytest.raises(OSError):
        gov.approve(req.id, "bob")
    audit.fail = False
    assert gov.get_request(req.id).status == "pending"
    assert gov.active_roles("acme", "u1") == frozenset()
    assert gov.assignments() == []
    audit.fail = True
    with pytest.raises(OSError):
        gov.request_role("acme", "u2", "admin", "alice")
    audit.fail = False
    assert [r.id for r in gov.requests()] == [req.id]


def test_revision_bumps_on_every_change(gov: Governance) -> None:
    revs = [gov.revision()]
    req = gov.request_role("acme", "u1", "admin", "alice")
    revs.append(gov.revision())
    gov.approve(req.id, "bob")
    revs.append(gov.revision())
    (a,) = gov.assignments()
    gov.revoke(a.id, "bob")
    revs.append(gov.revision())
    with pytest.raises(ConflictError):
        gov.revoke(a.id, "bob")  # refused: no change, no bump
    revs.append(gov.revision())
    assert revs == [0, 1, 2, 3, 3]
