"""Every shipped library policy, alone on top of a permit-all, with an allow and a deny case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from portcullis.policy.config import LIBRARY_POLICIES
from portcullis.policy.mapping import LIBRARY_DIR
from portcullis.policy.owners import Owner
from portcullis.policy.testing import load_setup, run_dir

from .helpers import WEDNESDAY_10, at, engine, principal


def decide(tmp_path: Path, library: list[str], p: Any, route: str, method: str, params: dict[str, str],
           **kw: Any) -> tuple[bool, tuple[str, ...]]:
    eng = engine(tmp_path, library=library)
    kw.setdefault("now", WEDNESDAY_10)
    kw.setdefault("client_ip", "10.1.1.1")
    d = eng.decide(eng.build_input(p, route=route, method=method, path_params=params, **kw))
    assert not d.errors, d.errors
    return d.allowed, d.policies


def test_every_library_policy_is_documented_and_tested() -> None:
    readme = (LIBRARY_DIR / "README.md").read_text()
    for name in LIBRARY_POLICIES:
        assert (LIBRARY_DIR / f"{name}.cedar").is_file()
        assert f"`{name}`" in readme
        assert f"test_{name}" in globals(), f"no test for {name}"


def test_tenant_isolation(tmp_path: Path) -> None:
    lib = ["tenant_isolation"]
    own = {"owner": Owner("alice", "acme")}
    assert decide(tmp_path, lib, principal(), "project", "GET", {"tenant": "acme", "id": "p1"}, **own)[0]
    # Another tenant in the path.
    allowed, why = decide(tmp_path, lib, principal(), "project", "GET", {"tenant": "globex", "id": "p1"})
    assert not allowed and why == ("portcullis.tenant_isolation", "portcullis.tenant_isolation.path")
    # The caller's own tenant in the path, but the object belongs to another tenant (BOLA).
    allowed, why = decide(tmp_path, lib, principal(), "project", "GET", {"tenant": "acme", "id": "g1"},
                          owner=Owner("gina", "globex"))
    assert not allowed and why == ("portcullis.tenant_isolation",)


def test_owner_only_writes(tmp_path: Path) -> None:
    lib = ["owner_only_writes"]
    params = {"tenant": "acme", "id": "p1"}
    assert decide(tmp_path, lib, principal("alice"), "project", "PUT", params, owner=Owner("alice", "acme"))[0]
    allowed, why = decide(tmp_path, lib, principal("bob"), "project", "PUT", params, owner=Owner("alice", "acme"))
    assert not allowed and why == ("portcullis.owner_only_writes",)
    # Reads by another user are not this policy's business.
    assert decide(tmp_path, lib, principal("bob"), "project", "GET", params, owner=Owner("alice", "acme"))[0]
    # Unknown owner: a write is refused (fail closed), whatever the method.
    for method in ("PUT", "DELETE"):
        assert not decide(tmp_path, lib, principal("alice"), "project", method, params, owner=None)[0]
    # Routes without an owner source are not "owned".
    assert decide(tmp_path, lib, principal("bob"), "list_projects", "POST", {"tenant": "acme"})[0]


def test_admin_business_hours(tmp_path: Path) -> None:
    lib = ["admin_business_hours"]
    p = principal(roles=("admin",))
    params = {"tenant": "acme"}
    assert decide(tmp_path, lib, p, "tenant_users", "POST", params, now=at("2025-03-05 09:00"))[0]
    assert decide(tmp_path, lib, p, "tenant_users", "POST", params, now=at("2025-03-05 16:59"))[0]
    for when in ("2025-03-05 17:00", "2025-03-05 08:59", "2025-03-08 11:00"):  # end, before start, Saturday
        allowed, why = decide(tmp_path, lib, p, "tenant_users", "POST", params, now=at(when))
        assert not allowed and why == ("portcullis.admin_business_hours",), when
    # Actions outside the admin group are unaffected at night.
    assert decide(tmp_path, lib, p, "list_projects", "GET", params, now=at("2025-03-05 23:00"))[0]


def test_phishing_resistant_billing(tmp_path: Path) -> None:
    lib = ["phishing_resistant_billing"]
    params = {"tenant": "acme"}
    assert decide(tmp_path, lib, principal(amr=("hwk", "user", "mfa")), "invoices", "GET", params)[0]
    assert decide(tmp_path, lib, principal(acr="urn:portcullis:acr:phr"), "invoices", "GET", params)[0]
    for kw in ({"amr": ("pwd", "otp", "mfa"), "acr": "urn:portcullis:acr:mfa"}, {"amr": ("pwd",)}, {}):
        allowed, why = decide(tmp_path, lib, principal(**kw), "invoices", "GET", params)
        assert not allowed and why == ("portcullis.phishing_resistant_billing",), kw
    assert decide(tmp_path, lib, principal(amr=("pwd",)), "list_projects", "GET", params)[0]


def test_block_high_risk(tmp_path: Path) -> None:
    lib = ["block_high_risk"]
    params = {"tenant": "acme"}
    assert decide(tmp_path, lib, principal(), "list_projects", "GET", params, risk_score=69)[0]
    for score in (70, 100, 500):  # the threshold itself, and out-of-range scores clamp to 100
        allowed, why = decide(tmp_path, lib, principal(), "list_projects", "GET", params, risk_score=score)
        assert not allowed and why == ("portcullis.block_high_risk",), score


def test_sensitivity_clearance(tmp_path: Path) -> None:
    lib = ["sensitivity_clearance"]
    params = {"tenant": "acme", "id": "s1"}
    assert decide(tmp_path, lib, principal(roles=("admin",)), "secrets", "GET", params)[0]
    # A tenant role's clearance counts for its own tenant's principals...
    assert decide(tmp_path, lib, principal(roles=("auditor",)), "secrets", "GET", params)[0]
    for roles in (("editor",), ("viewer",), ()):
        allowed, why = decide(tmp_path, lib, principal(roles=roles), "secrets", "GET", params)
        assert not allowed and why == ("portcullis.sensitivity_clearance",), roles
    # ...but a globex principal naming acme's role gets nothing from it.
    assert not decide(tmp_path, lib, principal(tenant="globex", roles=("auditor",)), "secrets", "GET",
                      {"tenant": "globex", "id": "s1"})[0]
    # Unlabelled routes are 'internal': the default clearance reads them.
    assert decide(tmp_path, lib, principal(roles=()), "list_projects", "GET", {"tenant": "acme"})[0]


@pytest.mark.parametrize("tz_time", ["2025-03-05 10:00"])
def test_example_policy_directory_passes_its_own_tests(tz_time: str) -> None:
    root = Path(__file__).resolve().parents[3] / "examples" / "policies"
    c, routes = load_setup(root / "policy.yaml")
    report = run_dir(root, c, routes, now=at(tz_time))
    assert report.ok, report.render()
    assert report.passed >= 12
