"""The engine: validation with located errors, decisions, fail-closed, cache, reload."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from portcullis.exchange import Principal
from portcullis.policy.engine import PolicyEngine, PolicyError, split_statements
from portcullis.policy.mapping import DecisionInput, generate_schema
from portcullis.policy.owners import Owner

from .helpers import PERMIT_ALL, ROUTES, WEDNESDAY_10, at, cfg, engine, principal, write_dir


def problems_of(tmp_path: Path, policies: dict[str, str], schema: str | None = None, **overrides: object) -> list[str]:
    c = cfg(**overrides)
    d = write_dir(tmp_path, policies, c, schema)
    with pytest.raises(PolicyError) as info:
        PolicyEngine(c, ROUTES, d)
    return [str(p) for p in info.value.problems]


def get(eng: PolicyEngine, route: str = "list_projects", method: str = "GET", *, now: float = WEDNESDAY_10,
        p: Principal | None = None, **kw: Any) -> DecisionInput:
    params = {"tenant": "acme", "id": "p1"} if route in ("project", "secrets") else {"tenant": "acme"}
    return eng.build_input(p or principal(), route=route, method=method, path_params=params,
                           client_ip="10.0.0.1", now=now, **kw)


# -- validation ------------------------------------------------------------------------

def test_typo_in_attribute_names_file_and_line(tmp_path: Path) -> None:
    text = PERMIT_ALL + '\n// owners edit\n@id("owner-edit")\npermit (principal, action, resource)\n' \
                        'when { resource has owner && resource.ownr == principal.subject };\n'
    probs = problems_of(tmp_path, {"ops.cedar": text})
    assert probs and all("ops.cedar:5 [owner-edit]" in p and "ownr" in p for p in probs), probs


def test_typo_in_context_attribute(tmp_path: Path) -> None:
    probs = problems_of(tmp_path, {"a.cedar": PERMIT_ALL, "b.cedar": "forbid (principal, action, resource)\n"
                                   "  when { context.risk_scroe > 50 };\n"})
    assert any("b.cedar:1" in p and "risk_scroe" in p for p in probs), probs


def test_typo_in_action_name(tmp_path: Path) -> None:
    text = PERMIT_ALL + '\npermit (principal, action == Action::"projct", resource);\n'
    probs = problems_of(tmp_path, {"ops.cedar": text})
    assert any("ops.cedar:4" in p and 'Action::"projct"' in p for p in probs), probs


def test_syntax_error_is_located(tmp_path: Path) -> None:
    text = PERMIT_ALL + '\n\n@id("x")\npermit (principal, action, resource) when { context.write && };\n'
    probs = problems_of(tmp_path, {"ops.cedar": text})
    assert probs and "ops.cedar:5" in probs[0] and "syntax error" in probs[0]


def test_route_without_action_and_action_without_route(tmp_path: Path) -> None:
    schema = generate_schema(cfg(), ROUTES).replace('action "invoices"', 'action "invoice"')
    probs = problems_of(tmp_path, {"ops.cedar": PERMIT_ALL}, schema=schema)
    assert any("route 'invoices' has no action in the schema" in p for p in probs), probs
    assert any("action 'invoice' names no route" in p for p in probs), probs


def test_schema_must_fit_the_mapping(tmp_path: Path) -> None:
    schema = generate_schema(cfg(), ROUTES).replace("  high_risk: Bool,\n", "")
    probs = problems_of(tmp_path, {"ops.cedar": PERMIT_ALL}, schema=schema)
    assert any("does not fit the schema" in p and "high_risk" in p for p in probs), probs


def test_library_policy_needs_its_group_in_an_operator_schema(tmp_path: Path) -> None:
    c = cfg(library=["admin_business_hours"])
    schema = generate_schema(cfg(action_groups={}), ROUTES)  # no "admin" group declared
    d = write_dir(tmp_path, {"ops.cedar": PERMIT_ALL}, c, schema)
    with pytest.raises(PolicyError) as info:
        PolicyEngine(c, ROUTES, d)
    assert any("library/admin_business_hours.cedar:3" in str(p) and "admin" in str(p) for p in info.value.problems)


def test_invalid_schema_and_missing_dir(tmp_path: Path) -> None:
    probs = problems_of(tmp_path, {"ops.cedar": PERMIT_ALL}, schema="entity User = {")
    assert any("schema.cedarschema" in p and "invalid Cedar schema" in p for p in probs)
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyEngine(cfg(), ROUTES, tmp_path / "nope")


def test_statement_splitter_ignores_semicolons_in_strings_and_comments() -> None:
    text = '// a; b\n@id("a;b")\npermit (principal, action, resource)\n  when { context.acr like "x;*" };\n' \
           '\n  forbid (principal, action, resource); // trailing; comment\n'
    st = split_statements(text, "f")
    assert [s.line for s in st] == [2, 6]
    assert st[0].text.strip().endswith('"x;*" };')


# -- decisions -----------------------------------------------------------------------

def test_rbac_inheritance_through_role_entities(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": '@id("viewers")\npermit (principal in Role::"viewer", action, resource);\n'})
    for roles in (("viewer",), ("editor",), ("admin",), ("auditor",)):  # auditor: acme's own role
        d = eng.decide(get(eng, p=principal(roles=roles)))
        assert d.allowed and d.policies == ("viewers",), roles
    assert not eng.decide(get(eng, p=principal(roles=("guest",)))).allowed
    # Just-in-time roles count like the credential's.
    assert eng.decide(get(eng, p=principal(roles=()), extra_roles=["editor"])).allowed
    # A role name that could name another tenant's role is ignored.
    d = eng.decide(get(eng, p=principal(tenant="globex", roles=("acme/auditor",))))
    assert not d.allowed and d.reason == "policy.no_permit"


def test_tenant_roles_are_tenant_scoped(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": '@id("aud")\npermit (principal in Role::"acme/auditor", action, resource);\n'})
    assert eng.decide(get(eng, p=principal(roles=("auditor",)))).allowed
    # globex has no auditor role: the name maps to a global Role::"auditor", not acme's.
    assert not eng.decide(get(eng, p=principal(tenant="globex", roles=("auditor",)))).allowed


def test_fail_closed_on_evaluation_error(tmp_path: Path) -> None:
    # Cedar skips a forbid whose evaluation errors (here: overflow) and would allow; we deny.
    text = PERMIT_ALL + '\n@id("overflow")\nforbid (principal, action, resource)\n' \
                        '  when { context.risk_score * 9223372036854775807 * 2 > 0 };\n'
    eng = engine(tmp_path, {"ops.cedar": text})
    d = eng.decide(get(eng, risk_score=1))
    assert not d.allowed and d.errors and d.reason == "policy.error"
    assert "overflow" in d.errors[0]
    # Errors are not cached: the same input is evaluated again.
    assert not eng.decide(get(eng, risk_score=1)).cached


def test_fail_closed_on_engine_exception(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    good = get(eng)
    # A resource entity that collides with a base role entity: cedarpy raises.
    clash = ({"uid": {"type": "Role", "id": "viewer"}, "attrs": {}, "parents": [{"type": "Role", "id": "admin"}]},)
    bad = DecisionInput.make(good.principal, good.action, good.resource, good.context, good.entities[:1] + clash)
    d = eng.decide(bad)
    assert not d.allowed and d.errors and d.errors[0].startswith("engine error")
    # A context of the wrong type: the permit-all still matches, but a forbid reading it errors.
    forbid = '\nforbid (principal, action, resource) when { context.high_risk };\n'
    eng2 = engine(tmp_path, {"ops.cedar": PERMIT_ALL + forbid})
    g2 = get(eng2)
    wrong = DecisionInput.make(g2.principal, g2.action, g2.resource, {**g2.context, "high_risk": "no"}, g2.entities)
    d2 = eng2.decide(wrong)
    assert not d2.allowed and d2.errors


def test_default_deny_without_permit(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": 'permit (principal in Role::"admin", action, resource);\n'})
    d = eng.decide(get(eng))
    assert not d.allowed and d.policies == () and d.reason == "policy.no_permit"


# -- cache ---------------------------------------------------------------------------------

def test_cache_hits_and_bounds(tmp_path: Path) -> None:
    subjects = " || ".join(f'principal.subject == "u{i}"' for i in range(10))
    eng = engine(tmp_path, {"ops.cedar": PERMIT_ALL + f"forbid (principal, action, resource) when {{ ({subjects}) "
                            "&& context.risk_score > 1000 };\n"}, decision_cache_size=3)
    first = eng.decide(get(eng))
    again = eng.decide(get(eng))
    assert first.allowed and not first.cached and again.cached and again.allowed
    # Ten distinct shapes (each subject a literal of the policies) fill a cache of three.
    for i in range(10):
        eng.decide(get(eng, p=principal(subject=f"u{i}")))
    assert len(eng._cache) == 3


def test_cache_key_covers_the_whole_input(tmp_path: Path) -> None:
    text = '@id("owner-only")\npermit (principal, action, resource) when { resource has owner && ' \
           'resource.owner == principal.subject };\n'
    eng = engine(tmp_path, {"ops.cedar": text})
    assert eng.decide(get(eng, "project", owner=Owner("alice", "acme"))).allowed
    # The owner changed (an entity change outside the policies): a different key, a fresh decision.
    d = eng.decide(get(eng, "project", owner=Owner("bob", "acme")))
    assert not d.allowed and not d.cached


def test_cached_allow_does_not_outlive_business_hours(tmp_path: Path) -> None:
    eng = engine(tmp_path, library=["admin_business_hours"])
    p = principal(roles=("admin",))
    assert eng.decide(get(eng, "tenant_users", "POST", p=p, now=at("2025-03-05 16:59:00"))).allowed
    assert eng.decide(get(eng, "tenant_users", "POST", p=p, now=at("2025-03-05 16:59:59"))).cached
    d = eng.decide(get(eng, "tenant_users", "POST", p=p, now=at("2025-03-05 17:00:00")))
    assert not d.allowed and d.policies == ("portcullis.admin_business_hours",)


def test_policy_change_invalidates_cache(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    d = tmp_path / "policies"
    assert eng.decide(get(eng)).allowed
    (d / "ops.cedar").write_text(PERMIT_ALL + '\n@id("no-lists")\nforbid (principal, action == '
                                 'Action::"list_projects", resource);\n')
    out = eng.reload_if_changed()
    assert out.changed and out.ok
    after = eng.decide(get(eng))
    assert not after.allowed and after.policies == ("no-lists",) and not after.cached


def test_role_change_invalidates_cache(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": 'permit (principal in Role::"viewer", action, resource);\n'})
    p = principal(roles=("intern",))
    assert not eng.decide(get(eng, p=p)).allowed
    roles = cfg().roles.model_dump(by_alias=True)
    roles["global"]["intern"] = {"inherits": ["viewer"]}
    gen = eng.generation
    out = eng.update(cfg(roles=roles))
    assert out.ok and eng.generation != gen
    assert eng.decide(get(eng, p=p)).allowed


# -- reload --------------------------------------------------------------------------------

def test_touch_without_change_keeps_generation(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    gen = eng.generation
    f = tmp_path / "policies" / "ops.cedar"
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    out = eng.reload_if_changed()
    assert not out.changed and eng.generation == gen


def test_broken_file_keeps_old_policies(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    gen = eng.generation
    d = tmp_path / "policies"
    (d / "new.cedar").write_text('permit (principal, action, resource) when { resource.nope };\n')
    out = eng.reload_if_changed()
    assert out.changed and not out.ok and eng.generation == gen
    assert any("new.cedar:1" in str(p) for p in out.problems)
    assert eng.last_problems == out.problems
    assert eng.decide(get(eng)).allowed  # still serving the old set
    # Reported once, not on every poll.
    assert not eng.reload_if_changed().changed
    (d / "new.cedar").write_text('forbid (principal, action == Action::"invoices", resource);\n')
    out = eng.reload_if_changed()
    assert out.ok and out.changed and eng.generation != gen and eng.last_problems == ()


def test_reload_under_concurrent_decisions(tmp_path: Path) -> None:
    """Threads decide while the policy set flips between two versions: no decision
    fails, and each one is wholly from one version."""
    eng = engine(tmp_path)
    d = tmp_path / "policies"
    v_a = PERMIT_ALL
    v_b = PERMIT_ALL + '\n@id("no-invoices")\nforbid (principal, action == Action::"invoices", resource);\n'
    stop = threading.Event()
    failures: list[str] = []
    counts = {"decisions": 0}

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            p = principal(subject=f"w{n}-{i % 50}")
            inv = eng.decide(get(eng, "invoices", p=p))
            other = eng.decide(get(eng, "list_projects", p=p))
            counts["decisions"] += 2
            if inv.errors or other.errors or not other.allowed:
                failures.append(f"{inv} {other}")
            if not inv.allowed and inv.policies != ("no-invoices",):
                failures.append(f"half a set? {inv}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            (d / "ops.cedar").write_text(v_b if swaps % 2 == 0 else v_a)
            out = eng.reload_if_changed()
            assert out.ok, out.problems
            swaps += 1 if out.changed else 0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert swaps >= 5 and counts["decisions"] > 100


async def test_watch_polls_and_stops(tmp_path: Path) -> None:
    import asyncio

    eng = engine(tmp_path, reload_poll_seconds=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(eng.watch(stop))
    gen = eng.generation
    (tmp_path / "policies" / "ops.cedar").write_text(PERMIT_ALL + "\nforbid (principal, action, resource);\n")
    for _ in range(100):
        await asyncio.sleep(0.02)
        if eng.generation != gen:
            break
    stop.set()
    await asyncio.wait_for(task, 2)
    assert eng.generation != gen and not eng.decide(get(eng)).allowed


def test_decision_is_immutable_and_has_generation(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    d = eng.decide(get(eng))
    assert d.generation == eng.generation
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
    assert replace(d, allowed=False, policies=()).reason == "policy.no_permit"
