"""Policy changes: four eyes, written atomically, refused as stale when the file moved on."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from portcullis.governance import (
    ConflictError,
    ForbiddenError,
    Governance,
    GovernanceConfig,
    GovernanceStore,
    InvalidRequestError,
)
from tests.unit.governance.conftest import Clock, GovFactory, MemoryAudit

OLD = 'permit(principal, action == Action::"read", resource);\n'
NEW = 'forbid(principal, action, resource) when { context.risk > 80 };\n'


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def test_policy_change_applies_after_second_admin(gov: Governance, policy_dir: Path, audit: MemoryAudit) -> None:
    target = policy_dir / "base.cedar"
    target.write_text(OLD)
    req = gov.request_policy_change("base.cedar", NEW, "alice", reason="block risky sessions")
    assert req.payload["base_sha256"] == sha(OLD) and req.payload["sha256"] == sha(NEW)
    assert target.read_text() == OLD  # nothing before approval
    with pytest.raises(ForbiddenError):
        gov.approve(req.id, "alice")
    assert target.read_text() == OLD
    gov.approve(req.id, "bob")
    assert target.read_text() == NEW
    assert sorted(p.name for p in policy_dir.iterdir()) == ["base.cedar"]  # no temp files left
    applied = audit.of("governance.applied")[0]
    assert applied.extra["file"] == "base.cedar" and applied.extra["sha256"] == sha(NEW)
    assert applied.extra["base_sha256"] == sha(OLD)
    assert all("text" not in e.extra for e in audit.events)  # the audit log carries hashes, not policies


def test_new_policy_file(gov: Governance, policy_dir: Path) -> None:
    req = gov.request_policy_change("extra.cedar", NEW, "alice")
    assert req.payload["base_sha256"] is None
    gov.approve(req.id, "bob")
    path = policy_dir / "extra.cedar"
    assert path.read_text() == NEW and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_file_mode_is_kept(gov: Governance, policy_dir: Path) -> None:
    target = policy_dir / "base.cedar"
    target.write_text(OLD)
    target.chmod(0o640)
    gov.approve(gov.request_policy_change("base.cedar", NEW, "alice").id, "bob")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_stale_policy_change_refused(gov: Governance, policy_dir: Path, audit: MemoryAudit) -> None:
    target = policy_dir / "base.cedar"
    target.write_text(OLD)
    req = gov.request_policy_change("base.cedar", NEW, "alice")
    hotfix = OLD + "// edited by hand\n"
    target.write_text(hotfix)
    with pytest.raises(ConflictError) as info:
        gov.approve(req.id, "bob")
    assert info.value.reason == "governance.stale"
    assert target.read_text() == hotfix  # the newer content is not overwritten
    closed = gov.get_request(req.id)
    assert closed.status == "rejected" and closed.decision_reason == "governance.stale"
    assert audit.of("governance.rejected")[0].extra["decision_reason"] == "governance.stale"
    assert audit.of("governance.stale")[0].decision == "deny"


def test_second_change_on_same_base_goes_stale(gov: Governance, policy_dir: Path) -> None:
    target = policy_dir / "base.cedar"
    target.write_text(OLD)
    first = gov.request_policy_change("base.cedar", NEW, "alice")
    second = gov.request_policy_change("base.cedar", OLD + "// v2\n", "carol")
    gov.approve(first.id, "bob")
    with pytest.raises(ConflictError):
        gov.approve(second.id, "bob")
    assert target.read_text() == NEW


def test_stale_at_request_time(gov: Governance, policy_dir: Path) -> None:
    (policy_dir / "base.cedar").write_text(OLD)
    with pytest.raises(ConflictError):
        gov.request_policy_change("base.cedar", NEW, "alice", base_sha256=sha("something else"),
                                  based_on_current=False)
    with pytest.raises(ConflictError):  # "new file" while it exists
        gov.request_policy_change("base.cedar", NEW, "alice", base_sha256=None, based_on_current=False)
    with pytest.raises(InvalidRequestError):
        gov.request("policy_change", {"file": "base.cedar", "text": NEW, "base_sha256": sha(OLD),
                                      "sha256": sha("not the text")}, "alice")
    ok = gov.request("policy_change", {"file": "base.cedar", "text": NEW, "base_sha256": sha(OLD)}, "alice")
    assert ok.status == "pending"


@pytest.mark.parametrize("name", ["../evil.cedar", "sub/x.cedar", "/etc/x.cedar", "x.txt", ".hidden.cedar",
                                  "x.cedar\n", "", "a" * 200 + ".cedar", "x.cedar/"])
def test_file_names_cannot_escape_policy_dir(gov: Governance, name: str) -> None:
    with pytest.raises(InvalidRequestError):
        gov.request_policy_change(name, NEW, "alice")


def test_symlinked_policy_file_refused(gov: Governance, policy_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (policy_dir / "link.cedar").symlink_to(outside)
    with pytest.raises(InvalidRequestError):
        gov.request_policy_change("link.cedar", NEW, "alice")
    # Swapped for a symlink after the request: refused at approval, target untouched.
    (policy_dir / "base.cedar").write_text(OLD)
    req = gov.request_policy_change("base.cedar", NEW, "alice")
    (policy_dir / "base.cedar").unlink()
    (policy_dir / "base.cedar").symlink_to(outside)
    with pytest.raises(InvalidRequestError):
        gov.approve(req.id, "bob")
    assert outside.read_text() == "precious"
    assert gov.get_request(req.id).status == "rejected"


def test_invalid_cedar_refused(gov: Governance) -> None:
    with pytest.raises(InvalidRequestError) as info:
        gov.request_policy_change("base.cedar", "permit(principal, action, resource) when {", "alice")
    assert info.value.reason == "governance.policy_invalid"
    with pytest.raises(InvalidRequestError):
        gov.request_policy_change("base.cedar", "x" * (256 * 1024 + 1), "alice")


def test_policy_check_hook_runs_at_request_and_approval(tmp_path: Path, clock: Clock, audit: MemoryAudit,
                                                        policy_dir: Path) -> None:
    allowed = {"ok": True}

    def schema_check(name: str, text: str) -> list[str]:
        return [] if allowed["ok"] else [f"{name}: unknown attribute"]

    gov = Governance(GovernanceStore(tmp_path / "g.db"),
                     GovernanceConfig(approvers=("alice", "bob"), policy_dir=str(policy_dir)), audit, clock=clock,
                     policy_check=schema_check)
    try:
        req = gov.request_policy_change("base.cedar", NEW, "alice")
        allowed["ok"] = False  # e.g. the schema changed meanwhile
        with pytest.raises(ConflictError) as info:
            gov.approve(req.id, "bob")
        assert info.value.reason == "governance.policy_invalid"
        assert not (policy_dir / "base.cedar").exists()
        with pytest.raises(InvalidRequestError):
            gov.request_policy_change("base.cedar", NEW, "alice")
    finally:
        gov.close()


def test_policy_dir_unset(make_gov: GovFactory) -> None:
    gov = make_gov(policy_dir=None)
    with pytest.raises(InvalidRequestError) as info:
        gov.request_policy_change("base.cedar", NEW, "alice")
    assert info.value.reason == "governance.policy_dir_unset"


def test_audit_failure_restores_old_file(gov: Governance, policy_dir: Path, audit: MemoryAudit) -> None:
    target = policy_dir / "base.cedar"
    target.write_text(OLD)
    req = gov.request_policy_change("base.cedar", NEW, "alice")
    audit.fail = True
    with pytest.raises(OSError):
        gov.approve(req.id, "bob")
    audit.fail = False
    assert target.read_text() == OLD
    assert gov.get_request(req.id).status == "pending"
    assert sorted(p.name for p in policy_dir.iterdir()) == ["base.cedar"]
    gov.approve(req.id, "bob")  # and it can still be approved once the log works
    assert target.read_text() == NEW


def test_readers_see_old_or_new_never_partial(make_gov: GovFactory, policy_dir: Path) -> None:
    """A reader polling the file during a series of approved changes only ever sees a
    complete version (large files, so a torn write would show)."""
    gov = make_gov()
    versions = [f"// version {i}\n" + f"// {'x' * 100} {i}\n" * 2000 + NEW for i in range(6)]
    hashes = {sha(v) for v in versions}
    target = policy_dir / "big.cedar"
    target.write_text(versions[0])
    seen: set[str] = set()
    bad: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            h = sha(data)
            if h not in hashes:
                bad.append(len(data))
            seen.add(h)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in versions[1:]:
            gov.approve(gov.request_policy_change("big.cedar", v, "alice").id, "bob")
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert target.read_text() == versions[-1]
    assert len(seen) >= 2
    assert not [p for p in os.listdir(policy_dir) if p.endswith(".tmp")]
