"""Cedar policies in the real gateway (issue 5): RBAC with JIT roles from governance,
object-level checks (BOLA) across users and tenants, the determining policies in the
audit event, atomic reload under load without a failed request, and `portcullis check`
refusing a policy that does not fit the schema."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.governance.service import GovernanceConfig, open_governance
from portcullis.keysadmin import create_key
from tests.integration.harness import Client, GatewayThread, find_audit_event, free_port, write_config
from tests.integration.test_process import cli

RBAC = """
// Readers may read their tenant's projects; editors may also create and delete.
@id("read-projects")
permit (principal in Role::"reader", action in [Action::"list-projects", Action::"get-project"], resource);

@id("edit-projects")
permit (principal in Role::"editor",
        action in [Action::"create-project", Action::"delete-project"], resource);
"""

POLICY = {
    "dir": "policies",
    "library": ["tenant_isolation", "owner_only_writes"],
    "roles": {"global": {"reader": {}, "editor": {"inherits": ["reader"]}}},
    "resources": {
        "get-project": {"type": "Project", "id_param": "id", "tenant_param": "tenant", "owner": "projects"},
        "delete-project": {"type": "Project", "id_param": "id", "tenant_param": "tenant", "owner": "projects"},
    },
    "owner_sources": {"projects": {"kind": "table", "entries": {
        "prj_ac000001": {"owner": "key:alice", "tenant": "acme"},
        "prj_ac000002": {"owner": "key:bob", "tenant": "acme"},
        "prj_9b000001": {"owner": "key:gina", "tenant": "globex"},
    }}},
    "reload_poll_seconds": 0.2,
}


@dataclass
class PEnv:
    port: int
    keys: dict[str, str]
    gw: GatewayThread
    policy_dir: Path
    data_dir: Path
    config: Path

    def as_(self, name: str) -> Client:
        return Client(self.port, {"X-API-Key": self.keys[name]})


@pytest.fixture(scope="module")
def penv(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PEnv]:
    root = tmp_path_factory.mktemp("policy")
    (root / "policies").mkdir()
    (root / "policies" / "rbac.cedar").write_text(RBAC)
    port = free_port()
    doc = demo_config(upstream.url, port, free_port())
    # Roles and scopes: the policy decides; scopes stay as the first gate.
    for r in doc["routes"]:
        r.pop("roles", None)
    doc["policy"] = POLICY
    doc["governance"] = {"approvers": ["root", "ops"], "policy_dir": "policies"}
    loaded = write_config(root, doc)
    keys = {}
    for name, tenant, roles in [("alice", "acme", ["editor"]), ("bob", "acme", ["editor"]),
                                ("rita", "acme", ["reader"]), ("gina", "globex", ["editor"]),
                                ("nobody", "acme", [])]:
        _, keys[name] = create_key(loaded.data_dir, name=name, tenant=tenant, roles=roles,
                                   scopes=["projects:read", "projects:write"])
    gw = GatewayThread(loaded)
    gw.start()
    assert loaded.path is not None
    yield PEnv(port, keys, gw, root / "policies", loaded.data_dir, loaded.path)
    gw.stop()


P = "/v1/tenants/acme/projects"


def test_rbac_allows_by_role_and_denies_without(penv: PEnv) -> None:
    assert penv.as_("rita").request("GET", P).status == 200
    assert penv.as_("alice").request("GET", P).status == 200  # editor inherits reader
    r = penv.as_("nobody").request("GET", P)
    assert r.status == 403 and r.json()["type"].endswith("/forbidden")
    event = find_audit_event(penv.gw, r.headers["x-request-id"])
    assert event.reason == "policy.no_permit"
    assert event.extra["policy"]["policy_decision"] == "deny"
    ok = penv.as_("rita").request("GET", P)
    facts = find_audit_event(penv.gw, ok.headers["x-request-id"]).extra["policy"]
    assert facts["policies"] == ["read-projects"]
    assert facts["policy_cached"] is True  # rita's first read above decided it


def test_one_decision_serves_every_input_of_its_shape_and_no_other(penv: PEnv) -> None:
    def facts(r: Any) -> dict[str, Any]:
        policy: dict[str, Any] = find_audit_event(penv.gw, r.headers["x-request-id"]).extra["policy"]
        return policy

    def counted() -> dict[str, float]:
        text = generate_latest(penv.gw.gw.metrics.registry).decode()
        found = re.findall(r'^portcullis_policy_decisions_total\{source="(\w+)"\} (\S+)$', text, re.M)
        assert "portcullis_policy_shapes 1.0" in text
        return {k: float(v) for k, v in found}

    own = penv.as_("alice").request("GET", f"{P}/prj_ac000001")  # an editor reads her own project
    assert own.status == 200
    before = counted()
    # bob, another editor, reads his own: the same shape, answered from alice's decision.
    his = penv.as_("bob").request("GET", f"{P}/prj_ac000002")
    assert his.status == 200 and facts(his)["policy_cached"] is True
    assert facts(his)["policies"] == facts(own)["policies"]
    after = counted()
    assert after["cache_shape"] == before["cache_shape"] + 1 and after["cedar"] == before["cedar"]
    # bob deleting alice's project is another relation (owner is not the caller): refused.
    probe = penv.as_("bob").request("DELETE", f"{P}/prj_ac000001")
    assert probe.status == 403 and facts(probe)["policies"] == ["portcullis.owner_only_writes"]


def test_bola_owner_only_writes_across_users_and_tenants(penv: PEnv) -> None:
    # bob may read alice's project (read policy), never delete it (owner-only writes).
    assert penv.as_("bob").request("GET", f"{P}/prj_ac000001").status == 200
    r = penv.as_("bob").request("DELETE", f"{P}/prj_ac000001")
    assert r.status == 403
    assert find_audit_event(penv.gw, r.headers["x-request-id"]).extra["policy"]["policies"] == [
        "portcullis.owner_only_writes"]
    # globex's project under acme's path: the owner source knows its real tenant.
    r = penv.as_("alice").request("GET", f"{P}/prj_9b000001")
    assert r.status == 403
    assert "portcullis.tenant_isolation" in find_audit_event(
        penv.gw, r.headers["x-request-id"]).extra["policy"]["policies"]
    # gina (globex) on acme's paths: refused before the policy by tenant binding.
    assert Client(penv.port, {"X-API-Key": penv.keys["gina"]}).request("GET", f"{P}/prj_ac000001").status == 403
    # the owner deletes her own project.
    assert penv.as_("alice").request("DELETE", f"{P}/prj_ac000001").status == 204


def test_jit_role_from_governance_grants_and_lapses(penv: PEnv) -> None:
    assert penv.as_("nobody").request("GET", P).status == 403
    gov = open_governance(penv.data_dir, GovernanceConfig(approvers=("root", "ops")))
    try:
        req = gov.request_jit("acme", "key:nobody", "reader", duration=2.0, requested_by="root", reason="incident 7")
        gov.approve(req.id, "ops")
    finally:
        gov.close()
    deadline = time.monotonic() + 5
    while penv.as_("nobody").request("GET", P).status != 200:
        assert time.monotonic() < deadline, "the JIT role never took effect"
        time.sleep(0.2)
    time.sleep(2.2)
    assert penv.as_("nobody").request("GET", P).status == 403  # lapsed by itself


def test_reload_under_load_never_fails_a_request(penv: PEnv) -> None:
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        c = penv.as_("rita")
        while not stop.is_set():
            statuses.append(c.request("GET", P).status)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    rbac = penv.policy_dir / "rbac.cedar"
    try:
        for i in range(6):
            rbac.write_text(RBAC + f"\n// revision {i}\n")
            time.sleep(0.3)
        # A broken policy keeps the old set: requests still pass.
        rbac.write_text(RBAC + "\npermit (principal, action, resource) when { resource.nonexistent };\n")
        time.sleep(0.6)
    finally:
        stop.set()
        for t in threads:
            t.join()
        rbac.write_text(RBAC)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    # A policy that drops the reader permit takes effect within a poll or two.
    rbac.write_text(RBAC.split("@id(\"edit-projects\")", maxsplit=1)[0].replace("read-projects", "x").replace(
        'principal in Role::"reader"', 'principal in Role::"editor"'))
    deadline = time.monotonic() + 5
    while penv.as_("rita").request("GET", P).status != 403:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rbac.write_text(RBAC)
    deadline = time.monotonic() + 5
    while penv.as_("rita").request("GET", P).status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_check_refuses_a_policy_that_does_not_fit_the_schema(penv: PEnv, tmp_path: Path) -> None:
    good = cli("check", str(penv.config))
    assert good.returncode == 0 and "policies ok" in good.stdout, good.stderr
    bad_dir = tmp_path / "policies"
    bad_dir.mkdir()
    (bad_dir / "typo.cedar").write_text('permit (principal, action == Action::"list-projectz", resource);\n')
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(penv.config.read_text().replace(str(penv.data_dir), str(tmp_path / "data")))
    res = cli("check", str(cfg))
    assert res.returncode == 1
    assert "typo.cedar:1" in res.stderr and "list-projectz" in res.stderr


def test_check_notes_a_policy_set_that_turns_shapes_off(penv: PEnv, tmp_path: Path) -> None:
    assert "note:" not in cli("check", str(penv.config)).stdout
    d = tmp_path / "policies"
    d.mkdir()
    (d / "rbac.cedar").write_text(RBAC + "\nforbid (principal, action, resource) when "
                                  '{ (if context.write then principal.subject else principal.tenant) like "z*" };\n')
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(penv.config.read_text().replace(str(penv.data_dir), str(tmp_path / "data")))
    res = cli("check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "note: the decision cache keys by whole inputs only: a policy uses `like` on something other " \
           "than an attribute" in res.stdout


def test_four_eyes_policy_change_checked_against_the_schema_then_enforced(penv: PEnv, tmp_path: Path) -> None:
    import json

    c = str(penv.config)
    typo = tmp_path / "typo.cedar"
    typo.write_text('permit (principal in Role::"reader", action == Action::"list-projectz", resource);\n')
    refused = cli("access", "request", "policy", str(typo), "--name", "rbac.cedar", "--as", "root", "--config", c)
    assert refused.returncode != 0 and "list-projectz" in refused.stderr, refused.stderr
    # A valid change that withdraws the readers' permission: requested by one admin...
    narrower = tmp_path / "rbac.cedar"
    narrower.write_text(RBAC.replace('principal in Role::"reader"', 'principal in Role::"editor"'))
    req = cli("access", "request", "policy", str(narrower), "--as", "root", "--json", "--config", c)
    assert req.returncode == 0, req.stderr
    rid = json.loads(req.stdout)["id"]
    assert penv.as_("rita").request("GET", P).status == 200  # nothing changes before approval
    self_approval = cli("access", "approve", rid, "--as", "root", "--config", c)
    assert self_approval.returncode == 1
    assert cli("access", "approve", rid, "--as", "ops", "--config", c).returncode == 0
    try:
        deadline = time.monotonic() + 5
        while penv.as_("rita").request("GET", P).status != 403:  # the gateway reloaded it
            assert time.monotonic() < deadline, "the approved policy was never enforced"
            time.sleep(0.1)
    finally:
        (penv.policy_dir / "rbac.cedar").write_text(RBAC)
