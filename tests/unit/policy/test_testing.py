"""`portcullis policy test` and `explain` semantics."""

from __future__ import annotations

from pathlib import Path

from portcullis.policy.testing import explain, run_dir

from .helpers import ROUTES, WEDNESDAY_10, cfg, engine, write_dir

POLICY = '@id("editors")\npermit (principal in Role::"editor", action, resource);\n'


def test_report_passes_fails_and_locates(tmp_path: Path) -> None:
    c = cfg(library=["owner_only_writes"])
    d = write_dir(tmp_path, {"ops.cedar": POLICY}, c)
    (d / "tests").mkdir()
    (d / "tests" / "a.yaml").write_text("""
cases:
  - name: own project
    principal: {subject: alice, tenant: acme, roles: [editor]}
    action: project
    method: PUT
    path: {tenant: acme, id: p1}
    resource: {owner: alice, tenant: acme}
    expect: allow
    policies: [editors]
  - name: wrong expectation
    principal: {subject: bob, tenant: acme, roles: [editor]}
    action: project
    method: PUT
    path: {tenant: acme, id: p1}
    resource: {owner: alice}
    expect: allow
  - name: ambiguous method
    principal: {subject: bob, tenant: acme}
    action: project
    expect: deny
""")
    (d / "broken.test.yaml").write_text("cases:\n  - principal: {subject: x}\n    expect: maybe\n")
    report = run_dir(d, c, ROUTES, now=WEDNESDAY_10)
    assert not report.ok and report.passed == 1 and report.failed == 2
    text = report.render()
    assert "expected allow, got deny" in text and "portcullis.owner_only_writes" in text
    assert "give 'method'" in text
    assert "broken.test.yaml" in text and "cases[0].expect" in text
    assert text.rstrip().endswith("1 passed, 3 failed")


def test_report_on_policy_load_error(tmp_path: Path) -> None:
    c = cfg()
    d = write_dir(tmp_path, {"ops.cedar": "permit (principal, action, resource) when { context.nope };\n"}, c)
    report = run_dir(d, c, ROUTES)
    assert not report.ok and any("ops.cedar:1" in p for p in report.problems)


def test_explain(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": POLICY}, library=["tenant_isolation"])
    desc = {"principal": {"subject": "alice", "tenant": "acme", "roles": ["editor"]}, "action": "project",
            "method": "GET", "path": {"tenant": "acme", "id": "g1"}, "resource": {"owner": "gina", "tenant": "globex"}}
    text = explain(eng, desc, now=WEDNESDAY_10)
    assert 'User::"acme/alice" -> Action::"project" -> Project::"g1" (GET)' in text
    assert "DENY (policy.forbid)" in text and "portcullis.tenant_isolation  (library/tenant_isolation.cedar:4)" in text
    desc["path"] = {"tenant": "acme", "id": "p1"}
    desc["resource"] = {"owner": "alice", "tenant": "acme"}
    text = explain(eng, desc, now=WEDNESDAY_10)
    assert "ALLOW" in text and "editors" in text and "ops.cedar:1" in text
    desc["principal"] = {"subject": "alice", "tenant": "acme"}
    assert "no permit policy applies" in explain(eng, desc, now=WEDNESDAY_10)
    assert explain(eng, {"principal": {"subject": "a", "tenant": "b"}, "action": "nope"},
                   now=0).startswith("invalid request description: no route")
