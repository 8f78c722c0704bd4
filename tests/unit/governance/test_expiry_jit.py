"""Requests expire; just-in-time roles lapse by themselves (no background job)."""

from __future__ import annotations

import pytest

from portcullis.governance import ConflictError, Governance, InvalidRequestError
from tests.unit.governance.conftest import Clock, GovFactory, MemoryAudit


def test_request_expires_unapproved(gov: Governance, clock: Clock, audit: MemoryAudit) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice", ttl=3600)
    assert req.expires_at == clock.now + 3600
    clock.advance(3600)
    assert gov.get_request(req.id).status_at(clock.now) == "expired"
    with pytest.raises(ConflictError) as info:
        gov.approve(req.id, "bob")
    assert info.value.reason == "governance.request_expired"
    stored = gov.get_request(req.id)
    assert stored.status == "expired"
    assert gov.active_roles("acme", "u1") == frozenset()
    assert audit.of("governance.expired")[0].extra["change_id"] == req.id
    assert audit.of("governance.request_expired")[0].decision == "deny"


def test_approve_just_before_expiry_works(gov: Governance, clock: Clock) -> None:
    req = gov.request_role("acme", "u1", "admin", "alice", ttl=3600)
    clock.advance(3599)
    gov.approve(req.id, "bob")
    assert gov.active_roles("acme", "u1") == {"admin"}


def test_expire_due_sweeps_and_audits(gov: Governance, clock: Clock, audit: MemoryAudit) -> None:
    short = gov.request_role("acme", "u1", "admin", "alice", ttl=600)
    long = gov.request_role("acme", "u2", "admin", "alice", ttl=7200)
    clock.advance(601)
    done = gov.expire_due()
    assert [r.id for r in done] == [short.id]
    assert gov.get_request(short.id).status == "expired"
    assert gov.get_request(long.id).status == "pending"
    assert gov.expire_due() == []  # idempotent
    (ev,) = audit.of("governance.expired")
    assert ev.subject == "system" and ev.extra["change_id"] == short.id
    assert gov.reject(long.id, "bob").status == "rejected"
    with pytest.raises(ConflictError):
        gov.approve(short.id, "bob")


def test_request_ttl_bounds(make_gov: GovFactory, clock: Clock) -> None:
    gov = make_gov(request_ttl_seconds=1800, max_request_ttl_seconds=86400)
    assert gov.request_role("acme", "u1", "admin", "alice").expires_at == clock.now + 1800
    for bad in (86401, 0, -5, float("nan"), float("inf")):
        with pytest.raises(InvalidRequestError):
            gov.request_role("acme", "u2", "admin", "alice", ttl=bad)


def test_jit_role_lapses_by_itself(make_gov: GovFactory, clock: Clock) -> None:
    # A long cache period: lapse must not depend on a refresh.
    gov = make_gov(jit_max_seconds=4 * 3600, cache_seconds=60)
    req = gov.request_jit("acme", "u1", "dba", duration=2 * 3600, requested_by="u1", reason="incident 7")
    clock.advance(1800)  # the clock starts at approval, not at the request
    approved_at = clock.now
    gov.approve(req.id, "bob")
    (a,) = gov.assignments()
    assert a.kind == "jit" and a.expires_at == approved_at + 7200
    assert gov.active_roles("acme", "u1") == {"dba"}
    clock.advance(7199)
    assert gov.active_roles("acme", "u1") == {"dba"}
    clock.advance(1)
    assert gov.active_roles("acme", "u1") == frozenset()
    assert gov.assignments(active_only=True) == []
    assert gov.assignments()[0].status(clock.now) == "expired"


def test_jit_and_standing_roles_combine(gov: Governance, clock: Clock) -> None:
    gov.approve(gov.request_role("acme", "u1", "viewer", "alice").id, "bob")
    gov.approve(gov.request_jit("acme", "u1", "dba", duration=600, requested_by="alice", reason="fix").id, "bob")
    assert gov.active_roles("acme", "u1") == {"viewer", "dba"}
    clock.advance(601)
    assert gov.active_roles("acme", "u1") == {"viewer"}


def test_jit_duration_bounded(make_gov: GovFactory) -> None:
    gov = make_gov(jit_max_seconds=3600)
    with pytest.raises(InvalidRequestError) as info:
        gov.request_jit("acme", "u1", "dba", duration=3601, requested_by="alice", reason="x")
    assert info.value.reason == "governance.duration_exceeds_max"
    with pytest.raises(InvalidRequestError):
        gov.request_jit("acme", "u1", "dba", duration=0, requested_by="alice", reason="x")
    with pytest.raises(InvalidRequestError):
        gov.request_jit("acme", "u1", "dba", duration=600, requested_by="alice", reason="  ")  # reason required


def test_jit_max_lowered_after_request_still_bounds(make_gov: GovFactory, clock: Clock) -> None:
    req = make_gov(jit_max_seconds=7200).request_jit("acme", "u1", "dba", duration=7200, requested_by="alice",
                                                     reason="migration")
    strict = make_gov(jit_max_seconds=600)
    strict.approve(req.id, "bob")
    (a,) = strict.assignments()
    assert a.expires_at == clock.now + 600


def test_revoke_ends_jit_early_and_other_instances_see_it(make_gov: GovFactory, clock: Clock,
                                                          audit: MemoryAudit) -> None:
    gateway = make_gov(cache_seconds=0)  # the gateway's instance, polling the revision
    admin = make_gov()
    gov_req = admin.request_jit("acme", "u1", "dba", duration=3600, requested_by="alice", reason="fix")
    admin.approve(gov_req.id, "bob")
    assert gateway.active_roles("acme", "u1") == {"dba"}
    (a,) = admin.assignments()
    revoked = admin.revoke(a.id, "carol", "done early")
    assert revoked.revoked_by == "carol" and revoked.revoked_at == clock.now
    assert gateway.active_roles("acme", "u1") == frozenset()
    (ev,) = audit.of("governance.revoked")
    assert ev.subject == "carol" and ev.extra["assignment_id"] == a.id


def test_cache_serves_snapshot_until_revision_changes(make_gov: GovFactory) -> None:
    ticks = [0.0]
    gateway = make_gov(cache_seconds=5, monotonic=lambda: ticks[0])
    admin = make_gov()
    assert gateway.active_roles("acme", "u1") == frozenset()
    admin.approve(admin.request_role("acme", "u1", "admin", "alice").id, "bob")
    assert gateway.active_roles("acme", "u1") == frozenset()  # within cache_seconds
    ticks[0] = 5.0
    assert gateway.active_roles("acme", "u1") == {"admin"}


def test_revoke_rules(gov: Governance) -> None:
    gov.approve(gov.request_role("acme", "u1", "admin", "alice").id, "bob")
    (a,) = gov.assignments()
    from portcullis.governance import ForbiddenError, NotFoundError

    with pytest.raises(ForbiddenError):
        gov.revoke(a.id, "mallory")
    with pytest.raises(NotFoundError):
        gov.revoke("ra_000000000000", "bob")
    gov.revoke(a.id, "alice")  # the grantor may take it back
    with pytest.raises(ConflictError):
        gov.revoke(a.id, "bob")
