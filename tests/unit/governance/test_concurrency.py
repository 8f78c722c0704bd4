"""Concurrent approvals of one request, from separate engines (as separate processes
would): exactly one applies."""

from __future__ import annotations

import threading
from pathlib import Path

from portcullis.governance import ConflictError, Governance, GovernanceError
from tests.unit.governance.conftest import GovFactory, MemoryAudit

APPROVERS = tuple(f"admin{i}" for i in range(8))


def race(govs: list[Governance], request_ids: list[str]) -> tuple[list[str], list[GovernanceError]]:
    barrier = threading.Barrier(len(govs))
    wins: list[str] = []
    losses: list[GovernanceError] = []
    lock = threading.Lock()

    def approve(i: int) -> None:
        barrier.wait()
        try:
            govs[i].approve(request_ids[i % len(request_ids)], APPROVERS[i])
            with lock:
                wins.append(APPROVERS[i])
        except GovernanceError as exc:
            with lock:
                losses.append(exc)

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(len(govs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins, losses


def test_concurrent_approvals_apply_exactly_once(make_gov: GovFactory, audit: MemoryAudit) -> None:
    govs = [make_gov(approvers=APPROVERS) for _ in APPROVERS]
    req = govs[0].request_role("acme", "u1", "admin", "requester")
    wins, losses = race(govs, [req.id])
    assert len(wins) == 1
    assert len(losses) == len(govs) - 1
    assert all(isinstance(e, ConflictError) and e.reason == "governance.not_pending" for e in losses)
    assert len(govs[0].assignments()) == 1
    assert len(audit.of("governance.applied")) == 1
    assert govs[0].get_request(req.id).decided_by == wins[0]


def test_concurrent_policy_changes_on_one_base(make_gov: GovFactory, policy_dir: Path) -> None:
    target = policy_dir / "base.cedar"
    target.write_text("permit(principal, action, resource);\n")
    govs = [make_gov(approvers=APPROVERS) for _ in range(4)]
    texts = [f"// change {i}\nforbid(principal, action, resource);\n" for i in range(4)]
    reqs = [govs[0].request_policy_change("base.cedar", t, "requester").id for t in texts]
    wins, losses = race(govs, reqs)
    assert len(wins) == 1
    assert all(e.reason == "governance.stale" for e in losses)
    winner = APPROVERS.index(wins[0])
    assert target.read_text() == texts[winner]
    statuses = sorted(govs[0].get_request(r).status for r in reqs)
    assert statuses == ["applied", "rejected", "rejected", "rejected"]
