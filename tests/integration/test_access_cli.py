"""`portcullis access` end to end on a real data directory: four eyes, JIT, break-glass
with its alert, revoke, policy changes (stale and applied), listing, bad input, and an
audit log that still verifies afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import portcullis.cli_access  # noqa: F401 - registers `access`
from portcullis.audit.events import AuditEvent
from portcullis.cli import app
from portcullis.gateway import open_audit_store

ROOT = Path(__file__).resolve().parents[2]
OLD = 'permit(principal, action == Action::"read", resource);\n'
NEW = 'forbid(principal, action, resource) when { context.risk > 80 };\n'

GOVERNANCE_YAML = """\
approvers: [alice, bob]
break_glass_actors: [oncall]
jit_max_seconds: 14400
break_glass_max_seconds: 3600
policy_dir: policies
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "governance.yaml").write_text(GOVERNANCE_YAML)
    (d / "policies").mkdir()
    return d


def run(data_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["access", *args, "--data-dir", str(data_dir)])


def ok(data_dir: Path, *args: str) -> Result:
    res = run(data_dir, *args)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def requested_id(res: Result) -> str:
    doc: dict[str, Any] = json.loads(res.stdout)
    assert doc["status"] == "pending"
    return str(doc["id"])


def listing(data_dir: Path, *flags: str) -> dict[str, list[dict[str, Any]]]:
    doc: dict[str, list[dict[str, Any]]] = json.loads(ok(data_dir, "list", "--json", *flags).stdout)
    return doc


def audit_events(data_dir: Path) -> list[AuditEvent]:
    store = open_audit_store(data_dir, writable=False)
    try:
        return list(store.iter_events())
    finally:
        store.close()


def test_four_eyes_role_assignment(data_dir: Path) -> None:
    rid = requested_id(ok(data_dir, "request", "role", "--tenant", "acme", "--principal", "u1", "--role", "admin",
                          "--as", "alice", "--reason", "new lead", "--json"))
    res = run(data_dir, "approve", rid, "--as", "alice")
    assert res.exit_code == 1
    assert res.stderr.startswith("error: four eyes")
    assert listing(data_dir, "--active")["assignments"] == []
    res = run(data_dir, "approve", rid, "--as", "mallory")
    assert res.exit_code == 1 and "may not approve" in res.stderr
    res = ok(data_dir, "approve", rid, "--as", "bob")
    assert f"approved and applied {rid}" in res.stdout
    (a,) = listing(data_dir, "--active")["assignments"]
    assert (a["tenant"], a["principal"], a["role"], a["kind"], a["granted_by"], a["approved_by"]) == (
        "acme", "u1", "admin", "standing", "alice", "bob")
    (r,) = listing(data_dir)["requests"]
    assert (r["status"], r["decided_by"]) == ("applied", "bob")
    reasons = [(e.reason, e.subject, e.decision) for e in audit_events(data_dir)]
    assert reasons == [("governance.requested", "alice", "allow"), ("governance.self_approval", "alice", "deny"),
                       ("governance.not_approver", "mallory", "deny"), ("governance.approved", "bob", "allow"),
                       ("governance.applied", "bob", "allow")]


def test_jit_break_glass_and_revoke(data_dir: Path) -> None:
    res = run(data_dir, "request", "jit", "--tenant", "acme", "--principal", "u2", "--role", "dba", "--for", "5h",
              "--reason", "migration", "--as", "alice")
    assert res.exit_code == 2 and "exceeds the maximum" in res.stderr
    rid = requested_id(ok(data_dir, "request", "jit", "--tenant", "acme", "--principal", "u2", "--role", "dba",
                          "--for", "2h", "--reason", "migration", "--as", "alice", "--json"))
    ok(data_dir, "approve", rid, "--as", "bob")
    (jit,) = listing(data_dir, "--active")["assignments"]
    assert jit["kind"] == "jit" and jit["expires_at"] - jit["granted_at"] == pytest.approx(7200)

    res = run(data_dir, "break-glass", "--tenant", "acme", "--principal", "u3", "--role", "dba", "--for", "2h",
              "--reason", "INC-1", "--as", "oncall")
    assert res.exit_code == 2 and "error: duration" in res.stderr
    res = run(data_dir, "break-glass", "--tenant", "acme", "--principal", "u3", "--role", "dba", "--for", "30m",
              "--reason", "INC-1", "--as", "mallory")
    assert res.exit_code == 1 and "may not break glass" in res.stderr
    res = ok(data_dir, "break-glass", "--tenant", "acme", "--principal", "u3", "--role", "dba", "--for", "30m",
             "--reason", "INC-1", "--as", "oncall")
    assert "BREAK-GLASS" in res.stdout
    bg = next(a for a in listing(data_dir, "--active")["assignments"] if a["kind"] == "break_glass")
    assert bg["expires_at"] - bg["granted_at"] == pytest.approx(1800) and bg["approved_by"] is None
    alerts = [e for e in audit_events(data_dir) if e.kind == "alert"]
    assert [(e.reason, e.subject, e.extra["assignment_id"]) for e in alerts] == [
        ("governance.break_glass", "oncall", bg["id"])]

    res = run(data_dir, "revoke", bg["id"], "--as", "mallory")
    assert res.exit_code == 1
    ok(data_dir, "revoke", bg["id"], "--as", "bob", "--reason", "resolved")
    assert [a["kind"] for a in listing(data_dir, "--active")["assignments"]] == ["jit"]
    everything = listing(data_dir)["assignments"]
    assert {a["id"]: a["status"] for a in everything}[bg["id"]] == "revoked"
    res = run(data_dir, "revoke", bg["id"], "--as", "bob")
    assert res.exit_code == 1 and "revoked" in res.stderr


def test_policy_change_stale_then_applied(data_dir: Path, tmp_path: Path) -> None:
    target = data_dir / "policies" / "base.cedar"
    target.write_text(OLD)
    new_file = tmp_path / "base.cedar"
    new_file.write_text(NEW)
    rid = requested_id(ok(data_dir, "request", "policy", str(new_file), "--as", "alice", "--json"))
    shown = json.loads(ok(data_dir, "show", rid, "--json").stdout)
    assert shown["payload"]["text"] == NEW and shown["payload"]["file"] == "base.cedar"
    assert NEW in ok(data_dir, "show", rid).stdout
    target.write_text(OLD + "// hotfix\n")  # someone changed it meanwhile
    res = run(data_dir, "approve", rid, "--as", "bob")
    assert res.exit_code == 1 and "has changed" in res.stderr
    assert target.read_text() == OLD + "// hotfix\n"

    rid2 = requested_id(ok(data_dir, "request", "policy", str(new_file), "--as", "alice", "--json"))
    ok(data_dir, "approve", rid2, "--as", "bob")
    assert target.read_text() == NEW

    bad = tmp_path / "bad.cedar"
    bad.write_text("permit(principal, action, resource) when {")
    res = run(data_dir, "request", "policy", str(bad), "--as", "alice")
    assert res.exit_code == 2 and "policy rejected" in res.stderr
    res = run(data_dir, "request", "policy", str(new_file), "--name", "../escape.cedar", "--as", "alice")
    assert res.exit_code == 2 and res.stderr.startswith("error: file")
    big = tmp_path / "big.cedar"
    big.write_text("//" + "x" * 300_000)
    res = run(data_dir, "request", "policy", str(big), "--as", "alice")
    assert res.exit_code == 2 and "larger than" in res.stderr


def test_reject_removal_pending_list_and_expire(data_dir: Path) -> None:
    rid = requested_id(ok(data_dir, "request", "role", "--tenant", "acme", "--principal", "u1", "--role", "admin",
                          "--as", "alice", "--json"))
    ok(data_dir, "approve", rid, "--as", "bob")
    rm = requested_id(ok(data_dir, "request", "removal", "--tenant", "acme", "--principal", "u1", "--role", "admin",
                         "--as", "bob", "--json"))
    other = requested_id(ok(data_dir, "request", "role", "--tenant", "acme", "--principal", "u9", "--role", "admin",
                            "--as", "bob", "--ttl", "1h", "--json"))
    assert {r["id"] for r in listing(data_dir, "--pending")["requests"]} == {rm, other}
    assert "rejected" in ok(data_dir, "reject", other, "--as", "alice", "--reason", "no").stdout
    ok(data_dir, "approve", rm, "--as", "alice")
    assert listing(data_dir, "--active")["assignments"] == []
    assert listing(data_dir, "--pending")["requests"] == []
    assert "expired 0 request(s)" in ok(data_dir, "expire").stdout
    table = ok(data_dir, "list").stdout
    assert rid in table and "applied" in table and "rejected" in table


def test_bad_input_gives_one_error_line(data_dir: Path, tmp_path: Path) -> None:
    res = run(data_dir, "approve", "req_000000000000", "--as", "bad name")
    assert res.exit_code == 2 and res.stderr.startswith("error: --as")
    res = run(data_dir, "approve", "req_000000000000", "--as", "bob")
    assert res.exit_code == 1 and res.stderr == "error: no request req_000000000000\n"
    res = run(data_dir, "approve", "nonsense", "--as", "bob")
    assert res.exit_code == 2 and res.stderr.startswith("error: request id")
    res = run(data_dir, "request", "role", "--tenant", "acme corp", "--principal", "u1", "--role", "admin",
              "--as", "alice")
    assert res.exit_code == 2 and res.stderr.startswith("error: tenant")
    res = CliRunner().invoke(app, ["access", "list"])
    assert res.exit_code == 2 and "exactly one of --config" in res.stderr
    res = run(tmp_path / "missing", "list")
    assert res.exit_code == 1 and "no such directory" in res.stderr
    (data_dir / "governance.yaml").write_text("approvers: [alice]\nbreak_glass_max_seconds: 999999\n")
    res = run(data_dir, "list")
    assert res.exit_code == 1 and "break_glass_max_seconds" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_audit_log_verifies_after_governance(data_dir: Path) -> None:
    rid = requested_id(ok(data_dir, "request", "role", "--tenant", "acme", "--principal", "u1", "--role", "admin",
                          "--as", "alice", "--json"))
    ok(data_dir, "approve", rid, "--as", "bob")
    ok(data_dir, "break-glass", "--tenant", "acme", "--principal", "u3", "--role", "dba", "--for", "10m",
       "--reason", "INC-2", "--as", "oncall")
    res = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])
    assert res.exit_code == 0 and "chain and checkpoints intact" in res.stdout
    assert oct((data_dir / "governance.db").stat().st_mode & 0o777) == "0o600"


def test_with_gateway_config_defaults_refuse_approval(tmp_path: Path) -> None:
    """--config: settings from the config's `governance:` section; without one nobody may approve."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("data_dir: ./state\nupstreams:\n  api: {url: \"http://127.0.0.1:9000\"}\n"
                   "routes:\n  - {name: health, path: /health, methods: [GET], upstream: api, public: true}\n")
    (tmp_path / "state").mkdir()
    base = ["--config", str(cfg)]
    res = CliRunner().invoke(app, ["access", "request", "role", "--tenant", "acme", "--principal", "u1", "--role",
                                   "admin", "--as", "alice", "--json", *base])
    assert res.exit_code == 0, res.stderr
    rid = json.loads(res.stdout)["id"]
    res = CliRunner().invoke(app, ["access", "approve", rid, "--as", "bob", *base])
    assert res.exit_code == 1 and "may not approve" in res.stderr
    assert (tmp_path / "state" / "governance.db").exists()


def test_fresh_process(data_dir: Path) -> None:
    """The module registers itself in a fresh interpreter and exits cleanly."""
    code = "import portcullis.cli_access; from portcullis.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code, "access", "list", "--json", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"requests": [], "assignments": []}
