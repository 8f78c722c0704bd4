"""Decision shapes: the decision cache shares one decision between inputs Cedar cannot
tell apart, and only those. The property tests check every cached decision against a
fresh Cedar evaluation of the same input, on inputs built to collide with the policies'
literals, with each other and across tenants and owners."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portcullis.policy.engine import PolicyEngine
from portcullis.policy.mapping import DecisionInput
from portcullis.policy.owners import Owner
from portcullis.policy.shape import RENAMED, principal_shape, shape_key, shape_rules

from .helpers import ROUTES, WEDNESDAY_10, at, cfg, principal, write_dir

LIBRARY = ["tenant_isolation", "owner_only_writes", "admin_business_hours", "sensitivity_clearance",
           "block_high_risk"]
# Operator policies that compare request strings with literals, with each other and as
# set members, so that a renaming that is not one-to-one or touches a literal would show.
OPERATOR = """
@id("viewers-read")
permit (principal in Role::"viewer", action, resource) when { !context.write };
@id("editors-write")
permit (principal in Role::"editor", action in [Action::"project", Action::"list_projects"], resource);
@id("admins")
permit (principal in Role::"admin", action in Action::"admin", resource);
@id("alice-special")
forbid (principal, action == Action::"secrets", resource) when { principal.subject == "alice" };
@id("no-bob-projects")
forbid (principal, action, resource) when { resource has owner && resource.owner == "bob" };
@id("office-writes")
forbid (principal, action, resource)
  when { context.write && !context.networks.contains("office") && !context.mfa };
@id("self-named-tenant")
forbid (principal, action, resource) when { principal.subject == principal.tenant };
@id("globex-scoped")
forbid (principal, action, resource) when { principal.scopes.contains("globex") };
"""


def make_engine(tmp: Path, policies: str = OPERATOR, **overrides: Any) -> PolicyEngine:
    owners = {"kind": "table", "entries": {
        "p1": {"owner": "alice", "tenant": "acme"}, "p2": {"owner": "bob", "tenant": "acme"},
        "p3": {"owner": "acme", "tenant": "globex"}, "alice": {"owner": "carol", "tenant": "acme"}}}
    c = cfg(library=LIBRARY, owner_sources={"projects": owners}, **overrides)
    d = write_dir(tmp, {"ops.cedar": policies}, c)
    return PolicyEngine(c, ROUTES, d)


def inp(eng: PolicyEngine, subject: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("editor",),
        route: str = "project", method: str = "GET", rid: str = "p1", path_tenant: str = "acme",
        owner: Owner | None = None, ip: str = "10.0.0.1", now: float = WEDNESDAY_10,
        scopes: frozenset[str] = frozenset({"projects"})) -> DecisionInput:
    params = {"tenant": path_tenant, "id": rid}
    return eng.build_input(principal(subject, tenant, roles, scopes=scopes), route=route, method=method,
                           path_params=params, client_ip=ip, now=now, owner=owner)


def same(a: Any, b: Any) -> bool:
    return (a.allowed, a.policies, a.errors) == (b.allowed, b.policies, b.errors)


# -- the rules ---------------------------------------------------------------------------

def rules_of(text: str) -> Any:
    return shape_rules(cedarpy.PolicySet.from_str(text).to_pst(), [
        {"uid": {"type": "Role", "id": "viewer"}, "attrs": {"label": "base-string"}, "parents": []}])


def test_rules_keep_literals_entity_ids_and_base_strings() -> None:
    r = rules_of('permit (principal in Role::"admin", action == Action::"get", resource) '
                 'when { principal.subject == "alice" && context.tags.contains("x") };')
    assert r.keep is not None
    assert {"admin", "get", "alice", "x", "viewer", "base-string"} <= r.keep


@pytest.mark.parametrize(("text", "why"), [
    ('permit (principal, action, resource) when { principal.subject like "adm*" };', "like"),
    ('permit (principal, action, resource) when { ip(context.client_ip).isInRange(ip("10.0.0.0/8")) };',
     "ip()"),
    ('permit (principal, action, resource) when { decimal(principal.subject) > decimal("1.0") };',
     "decimal()"),
    ('permit (principal, action, resource) when { principal.hasTag(context.method) };', "tags"),
])
def test_rules_refuse_policies_that_read_string_content(text: str, why: str) -> None:
    r = rules_of(text)
    assert r.keep is None and why.rstrip("()") in r.reason


def test_unknown_operators_and_nodes_turn_shapes_off() -> None:
    root = cedarpy.PolicySet.from_str('permit (principal, action, resource) when { principal.a == "x" };').to_pst()
    tpl = next(iter(root.static_policies.values()))
    clause: Any = tpl.clauses[0]  # nodes a newer cedarpy could produce: outside pst's types
    odd_op = dataclasses.replace(clause, expr=dataclasses.replace(clause.expr, op="string_concat"))
    r = shape_rules(dataclasses.replace(tpl, clauses=(odd_op,)), [])
    assert r.keep is None and "string_concat" in r.reason

    @dataclasses.dataclass(frozen=True)
    class NewNode:
        arg: object

    odd_node = dataclasses.replace(clause, expr=NewNode(clause.expr))
    r = shape_rules(dataclasses.replace(tpl, clauses=(odd_node,)), [])
    assert r.keep is None and "NewNode" in r.reason


def test_extension_constructors_on_literals_are_fine() -> None:
    r = rules_of('permit (principal, action, resource) when { ip("10.0.0.1").isInRange(ip("10.0.0.0/8")) };')
    assert r.keep is not None and "10.0.0.1" in r.keep


def test_rules_refuse_a_kept_string_that_looks_like_a_token() -> None:
    assert shape_rules(cedarpy.PolicySet.from_str(
        'permit (principal, action, resource) when { principal.subject == "\\0" };').to_pst(), []).keep is None


def test_unreadable_policies_have_no_shapes() -> None:
    assert shape_rules(None, []).keep is None


# -- the key -----------------------------------------------------------------------------

KEEP = frozenset({"alice", "acme", "viewer", "project"})
ACTION = {"type": "Action", "id": "project"}


def ent(t: str, i: str, attrs: dict[str, Any], parents: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    return {"uid": {"type": t, "id": i}, "attrs": attrs, "parents": [{"type": a, "id": b} for a, b in parents]}


def key(p: dict[str, Any], r: dict[str, Any], ctx: dict[str, Any] | None = None,
        keep: frozenset[str] = KEEP) -> bytes | None:
    ps = principal_shape(p, keep)
    assert ps is not None
    return shape_key(ps, rest=[r], action=ACTION, uids=(p["uid"], r["uid"]), context=ctx or {}, keep=keep)


def test_one_to_one_renaming_shares_a_key() -> None:
    a = key(ent("User", "bob", {"subject": "bob", "tenant": "acme"}, (("Role", "viewer"),)),
            ent("Project", "p1", {"owner": "bob", "tenant": "acme"}))
    b = key(ent("User", "dan", {"subject": "dan", "tenant": "acme"}, (("Role", "viewer"),)),
            ent("Project", "p9", {"owner": "dan", "tenant": "acme"}))
    assert a is not None and a == b


@pytest.mark.parametrize("change", [
    {"owner": "eve"},            # owner no longer the subject
    {"owner": "alice"},          # a kept literal instead of a renamed name
    {"tenant": "globex"},        # a tenant other than the principal's
    {"tenant": "bob"},           # equal to a different value of the request
    {"owner": True},             # a bool where a string was
    {"level": 1},                # another attribute
])
def test_any_other_relation_changes_the_key(change: dict[str, Any]) -> None:
    p = ent("User", "bob", {"subject": "bob", "tenant": "acme"}, (("Role", "viewer"),))
    r = {"owner": "bob", "tenant": "acme"}
    assert key(p, ent("Project", "p1", r)) != key(p, ent("Project", "p1", {**r, **change}))


def test_bools_ints_and_types_are_told_apart() -> None:
    p = ent("User", "bob", {"n": True})
    q = ent("User", "bob", {"n": 1})
    r = ent("Project", "p1", {})
    assert key(p, r) != key(q, r)
    assert key(ent("User", "bob", {}), r) != key(ent("Client", "bob", {}), r)
    in_role, in_group = ent("User", "bob", {}, (("Role", "viewer"),)), ent("User", "bob", {}, (("Group", "viewer"),))
    assert key(in_role, r) != key(in_group, r)
    # a principal and resource with one id vs two ids
    assert key(ent("User", "x", {}), ent("User", "x", {})) != key(ent("User", "x", {}), ent("User", "y", {}))


def test_context_is_part_of_the_key() -> None:
    p, r = ent("User", "bob", {}), ent("Project", "p1", {})
    assert key(p, r, {"write": False}) != key(p, r, {"write": True})
    assert key(p, r, {"ip": "10.0.0.1"}) == key(p, r, {"ip": "10.0.0.2"})  # only compared, never parsed
    assert key(p, r, {"nets": ["viewer"]}) != key(p, r, {"nets": ["other"]})


@pytest.mark.parametrize("value", [{"__entity": {"type": "User", "id": "x"}}, {"__extn": {"fn": "ip", "arg": "1"}},
                                   {"__expr": "1"}, {"type": "User", "id": "x"}, [{"type": "User", "id": "x"}]])
def test_escapes_are_shapeless(value: Any) -> None:
    ps = principal_shape(ent("User", "bob", {"x": value}), KEEP)
    assert ps is None
    ok = principal_shape(ent("User", "bob", {}), KEEP)
    assert ok is not None
    assert shape_key(ok, rest=[ent("Project", "p", {"x": value})], action=ACTION, uids=(), context={},
                     keep=KEEP) is None
    assert shape_key(ok, rest=[], action=ACTION, uids=(), context={"x": value}, keep=KEEP) is None


def test_entity_tags_are_shapeless() -> None:
    assert principal_shape({**ent("User", "bob", {}), "tags": {"a": "b"}}, KEEP) is None


def test_tokens_are_not_strings_of_the_input() -> None:
    # A request string that looks like a token is itself renamed; kept strings never do.
    a = key(ent("User", RENAMED + "0", {"s": RENAMED + "1"}), ent("Project", "p1", {}))
    b = key(ent("User", "u", {"s": "v"}), ent("Project", "p1", {}))
    assert a == b


# -- the engine ----------------------------------------------------------------------------

def test_distinct_users_on_their_own_projects_share_one_decision(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    first = eng.decide(inp(eng, "u1", method="PUT", owner=Owner("u1", "acme"), rid="x1"))
    second = eng.decide(inp(eng, "u2", method="PUT", owner=Owner("u2", "acme"), rid="x2"))
    assert first.allowed and not first.cached
    assert second.allowed and second.cached
    assert (eng.misses, eng.hits) == (1, 1)
    # Each input is also kept by its whole text: the same input again needs no renaming.
    assert eng.decide(inp(eng, "u2", method="PUT", owner=Owner("u2", "acme"), rid="x2")).cached
    assert len(eng._cache) == 3  # one shape, two whole inputs


def test_bola_probe_is_not_served_from_the_owner_s_decision(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    assert eng.decide(inp(eng, "u1", method="PUT", owner=Owner("u1", "acme"), rid="x1")).allowed
    d = eng.decide(inp(eng, "u2", method="PUT", owner=Owner("u1", "acme"), rid="x1"))
    assert not d.allowed and not d.cached and d.policies == ("portcullis.owner_only_writes",)


def test_cross_tenant_probe_is_not_served_from_a_same_tenant_decision(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    assert eng.decide(inp(eng, "u1", tenant="t1", path_tenant="t1", owner=Owner("u1", "t1"))).allowed
    d = eng.decide(inp(eng, "u2", tenant="t2", path_tenant="t3", owner=Owner("u2", "t3")))
    assert not d.allowed and not d.cached
    assert "portcullis.tenant_isolation.path" in d.policies


def test_literals_are_not_renamed(tmp_path: Path) -> None:
    eng = make_engine(tmp_path)
    assert eng.decide(inp(eng, "u1", roles=("admin",), route="secrets", rid="s1")).allowed
    assert eng.decide(inp(eng, "u2", roles=("admin",), route="secrets", rid="s2")).cached
    d = eng.decide(inp(eng, "alice", roles=("admin",), route="secrets", rid="s1"))
    assert not d.allowed and not d.cached and d.policies == ("alice-special",)


def test_policies_that_read_strings_fall_back_to_whole_input_keys(tmp_path: Path) -> None:
    like = '\nforbid (principal, action, resource) when { principal.subject like "z*" };\n'
    eng = make_engine(tmp_path, OPERATOR + like)
    assert eng._state.shape.keep is None
    assert eng.decide(inp(eng, "u1")).allowed
    d = eng.decide(inp(eng, "z1"))
    assert not d.allowed and not d.cached
    assert eng.decide(inp(eng, "u2")).cached is False  # whole-input keys: a new user is a new key


# -- against fresh evaluation ----------------------------------------------------------------

# Names chosen to collide: with literals of the policies (alice, bob, office, globex, acme,
# viewer), with each other (a subject that is also a tenant or an owner) and with role ids.
NAMES = st.sampled_from(["alice", "bob", "acme", "globex", "viewer", "office", "u1", "u2", "t1"])
INPUTS = st.fixed_dictionaries({
    "subject": NAMES, "tenant": NAMES, "path_tenant": NAMES,
    "roles": st.sets(st.sampled_from(["viewer", "editor", "admin", "auditor"]), max_size=2).map(tuple),
    "route": st.sampled_from([r.name for r in ROUTES]),
    "write": st.booleans(),
    "rid": NAMES,
    "owner": st.one_of(st.none(), st.tuples(NAMES, NAMES)),
    "ip": st.sampled_from(["10.0.0.1", "192.0.2.7", "2001:db8::1"]),
    "hour": st.sampled_from(["10:00", "16:59", "17:00", "23:30"]),
    "scopes": st.sets(NAMES, max_size=2).map(frozenset),
})


def build(eng: PolicyEngine, d: dict[str, Any]) -> DecisionInput:
    route = next(r for r in ROUTES if r.name == d["route"])
    method = next((m for m in route.methods if (m != "GET") == d["write"]), route.methods[0])
    return inp(eng, d["subject"], d["tenant"], d["roles"], route=d["route"], method=method, rid=d["rid"],
               path_tenant=d["path_tenant"], owner=Owner(*d["owner"]) if d["owner"] else None, ip=d["ip"],
               now=at(f"2025-03-05 {d['hour']}"), scopes=d["scopes"])


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    return make_engine(tmp_path_factory.mktemp("shapes"), decision_cache_size=100_000)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(INPUTS)
def test_every_cached_decision_is_the_fresh_decision(shared_engine: PolicyEngine, d: dict[str, Any]) -> None:
    i = build(shared_engine, d)
    fresh = shared_engine.decide_uncached(i)
    served = shared_engine.decide(i)
    assert same(served, fresh), (d, served, fresh)


def test_distinct_users_hit_one_shape_of_the_shared_engine(shared_engine: PolicyEngine) -> None:
    # The property above is only worth something if cached decisions are served to inputs
    # other than the one that filled them: here 40 users on their own projects, one entry.
    eng = shared_engine
    before = eng.hits
    for n in range(40):
        eng.decide(inp(eng, f"user{n}", owner=Owner(f"user{n}", "acme"), rid=f"r{n}"))
    assert eng.hits - before >= 39
