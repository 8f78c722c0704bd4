"""Decision shapes: the decision cache shares one decision between inputs Cedar cannot
tell apart, and only those. The property tests check every cached decision against a
fresh Cedar evaluation of the same input, on inputs built to collide with the policies'
literals, with each other and across tenants and owners."""

from __future__ import annotations

import dataclasses
import random
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
    ('permit (principal, action, resource) when { (if context.write then principal.subject else "x") '
     'like "adm*" };', "like"),
    ('permit (principal, action, resource) when { ip(if context.write then context.client_ip else "::1")'
     '.isInRange(ip("10.0.0.0/8")) };', "ip()"),
    ('permit (principal, action, resource) when { principal.hasTag(context.method) };', "tags"),
])
def test_rules_refuse_policies_that_read_untraceable_string_content(text: str, why: str) -> None:
    r = rules_of(text)
    assert r.keep is None and why.rstrip("()") in r.reason


def test_rules_trace_the_attributes_whose_content_is_read() -> None:
    r = rules_of('permit (principal, action, resource) when { principal.email like "*@acme.example" && '
                 'ip(context.client_ip).isInRange(ip("10.0.0.0/8")) && decimal(resource.meta.price) '
                 '> decimal("1.0") && action.label like "x*" };')
    assert r.keep is not None
    assert r.read == {("principal", ("email",)), ("context", ("client_ip",)), ("resource", ("meta", "price")),
                      ("action", ("label",))}


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
        keep: frozenset[str] = KEEP, action: dict[str, str] = ACTION,
        uids: tuple[dict[str, str], dict[str, str]] | None = None) -> bytes | None:
    ps = principal_shape(p, keep)
    assert ps is not None
    return shape_key(ps, rest=[r], action=action, uids=uids or (p["uid"], r["uid"]), context=ctx or {}, keep=keep)


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


def test_the_action_and_the_request_uids_are_part_of_the_key() -> None:
    p, r = ent("User", "bob", {}), ent("Project", "p1", {})
    assert key(p, r) != key(p, r, action={"type": "Action", "id": "other"})
    # the request's resource is another entity than the one sent (or none of them)
    assert key(p, r) != key(p, r, uids=(p["uid"], {"type": "Project", "id": "p2"}))
    assert key(p, r) != key(p, r, uids=(r["uid"], p["uid"]))


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


def test_policies_that_read_untraceable_strings_fall_back_to_whole_input_keys(tmp_path: Path) -> None:
    like = ('\nforbid (principal, action, resource) when '
            '{ (if context.write then principal.subject else principal.tenant) like "z*" };\n')
    eng = make_engine(tmp_path, OPERATOR + like)
    assert eng._state.shape.keep is None
    assert eng.decide(inp(eng, "u1")).allowed
    d = eng.decide(inp(eng, "z1", method="PUT", owner=Owner("z1", "acme")))
    assert not d.allowed and not d.cached
    assert eng.decide(inp(eng, "u2")).cached is False  # whole-input keys: a new user is a new key


def test_context_strings_a_policy_reads_stay_in_the_key(tmp_path: Path) -> None:
    put = '\nforbid (principal, action, resource) when { context.method like "PU*" };\n'
    eng = make_engine(tmp_path, OPERATOR + put)
    assert eng._state.shape.read == {("context", ("method",))}
    own = Owner("u1", "acme")
    assert eng.decide(inp(eng, "u1", method="DELETE", owner=own)).allowed
    d = eng.decide(inp(eng, "u1", method="PUT", owner=own))  # a write too, but PUT
    assert not d.allowed and not d.cached


def test_resource_strings_a_policy_reads_stay_in_the_key(tmp_path: Path) -> None:
    like = '\nforbid (principal, action, resource) when { resource has owner && resource.owner like "t*" };\n'
    eng = make_engine(tmp_path, OPERATOR + like)
    assert eng._state.shape.read == {("resource", ("owner",))}
    assert eng.decide(inp(eng, "u1", owner=Owner("u2", "acme"), rid="r1")).allowed
    d = eng.decide(inp(eng, "u1", owner=Owner("t2", "acme"), rid="r2"))  # the same relations, a t* owner
    assert not d.allowed and not d.cached


def test_strings_a_policy_reads_stay_in_the_key(tmp_path: Path) -> None:
    like = '\nforbid (principal, action, resource) when { principal.subject like "z*" };\n'
    eng = make_engine(tmp_path, OPERATOR + like)
    assert eng._state.shape.keep is not None and eng._state.shape.read == {("principal", ("subject",))}
    assert eng.decide(inp(eng, "u1", rid="r1")).allowed
    assert eng.decide(inp(eng, "u1", rid="r2")).cached  # another project: renamed, same shape
    assert not eng.decide(inp(eng, "u2", rid="r3")).cached  # another subject: kept, another key
    d = eng.decide(inp(eng, "z1", rid="r4"))
    assert not d.allowed and not d.cached and "z1" not in str(d.policies)
    # The kept subject is kept wherever it appears: as the owner too (owner == subject
    # in one request, owner != subject in the other, with the same subject).
    assert eng.decide(inp(eng, "z2", method="PUT", owner=Owner("z2", "acme"))).policies != \
        eng.decide(inp(eng, "z2", method="PUT", owner=Owner("z3", "acme"))).policies


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
    "method": st.integers(0, 1),  # which of the route's methods of that kind (PUT or DELETE)
})


# Few kept values, many names: most inputs share a shape with an earlier one, so the
# cache answers often and any unsound sharing shows (the wide strategy above alone gives
# a shape hit in ~4% of examples; this one in about half).
NARROW = st.fixed_dictionaries({
    "subject": NAMES, "tenant": NAMES, "path_tenant": NAMES,
    "roles": st.sampled_from([("editor",), ("viewer",)]),
    "route": st.sampled_from(["project", "list_projects"]),
    "write": st.booleans(),
    "rid": NAMES,
    "owner": st.one_of(st.none(), st.tuples(NAMES, NAMES)),
    "ip": st.just("10.0.0.1"),
    "hour": st.just("10:00"),
    "scopes": st.just(frozenset({"projects"})),
    "method": st.integers(0, 1),
})


FRESH_NAMES = [f"n{i}" for i in range(40)]


def renamed(d: dict[str, Any], rng: Any) -> dict[str, Any]:
    """``d`` with some of its names (each with odds 2/3; never ``alice`` and ``bob``, which
    the policies name) swapped one-to-one for fresh ones: the same shape, unless a policy
    reads a swapped name's content."""
    fields = ("subject", "tenant", "path_tenant", "rid")
    names = {d[k] for k in fields} | set(d["owner"] or ()) | set(d["scopes"])
    movable = [n for n in sorted(names) if n not in ("alice", "bob") and rng.random() < 2 / 3]
    m = dict(zip(movable, rng.sample(FRESH_NAMES, len(movable)), strict=True))
    out = {**d, **{k: m.get(d[k], d[k]) for k in fields}}
    out["owner"] = tuple(m.get(n, n) for n in d["owner"]) if d["owner"] else None
    out["scopes"] = frozenset(m.get(n, n) for n in d["scopes"])
    return out


def nudged(d: dict[str, Any], rng: Any) -> dict[str, Any]:
    """``d`` with one thing changed: a string field set to a fresh name (wherever else
    the old value appears stays), or another method of the same kind. Usually another
    shape; a cache that ignored what changed would serve the original's decision."""
    field = rng.choice(["subject", "tenant", "path_tenant", "rid", "owner", "owner_tenant", "method"])
    fresh = rng.choice(FRESH_NAMES)
    if field == "method":
        return {**d, "method": d["method"] + 1}
    if field in ("owner", "owner_tenant"):
        if not d["owner"]:
            return {**d, "owner": (fresh, d["tenant"])}
        owner, tenant = d["owner"]
        return {**d, "owner": (fresh, tenant) if field == "owner" else (owner, fresh)}
    return {**d, field: fresh}


def build(eng: PolicyEngine, d: dict[str, Any]) -> DecisionInput:
    route = next(r for r in ROUTES if r.name == d["route"])
    kind = [m for m in route.methods if (m != "GET") == d["write"]] or route.methods
    method = kind[d["method"] % len(kind)]
    return inp(eng, d["subject"], d["tenant"], d["roles"], route=d["route"], method=method, rid=d["rid"],
               path_tenant=d["path_tenant"], owner=Owner(*d["owner"]) if d["owner"] else None, ip=d["ip"],
               now=at(f"2025-03-05 {d['hour']}"), scopes=d["scopes"])


# The same, with policies that read string content of attributes (`like`; Cedar's
# validator refuses extension constructors on anything but literals): those strings are
# kept in the key, wherever they appear in the request.
READING = OPERATOR + """
@id("no-x-subjects")
forbid (principal, action, resource) when { principal.subject like "*x*" };
@id("put-by-globex")
forbid (principal, action, resource) when { context.method like "PU*" && principal.tenant == "globex" };
@id("t-owned-writes")
forbid (principal, action, resource) when { context.write && resource has owner && resource.owner like "t*" };
"""
READING_NAMES = st.sampled_from(["alice", "bob", "acme", "globex", "x1", "ux", "t1", "t2", "u1", "office"])


@pytest.fixture(scope="module")
def shared_engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    return make_engine(tmp_path_factory.mktemp("shapes"), decision_cache_size=100_000)


@pytest.fixture(scope="module")
def reading_engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    eng = make_engine(tmp_path_factory.mktemp("reading"), READING, decision_cache_size=100_000)
    assert eng._state.shape.read == {("principal", ("subject",)), ("context", ("method",)),
                                     ("resource", ("owner",))}
    return eng


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(INPUTS)
def test_every_cached_decision_is_the_fresh_decision(shared_engine: PolicyEngine, d: dict[str, Any]) -> None:
    i = build(shared_engine, d)
    fresh = shared_engine.decide_uncached(i)
    served = shared_engine.decide(i)
    assert same(served, fresh), (d, served, fresh)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(INPUTS.map(lambda d: d).flatmap(lambda d: st.fixed_dictionaries({
    **{k: st.just(v) for k, v in d.items()},
    "subject": READING_NAMES, "tenant": READING_NAMES, "rid": READING_NAMES,
    "owner": st.one_of(st.none(), st.tuples(READING_NAMES, READING_NAMES))})))
def test_every_cached_decision_is_the_fresh_decision_when_policies_read_strings(
        reading_engine: PolicyEngine, d: dict[str, Any]) -> None:
    i = build(reading_engine, d)
    fresh = reading_engine.decide_uncached(i)
    served = reading_engine.decide(i)
    assert same(served, fresh), (d, served, fresh)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NARROW, st.randoms(use_true_random=False))
def test_renamed_twins_get_the_fresh_decision(shared_engine: PolicyEngine, d: dict[str, Any], rng: Any) -> None:
    # An input, then two one-to-one renamings of it: each twin is (usually) answered from
    # the first one's cache entry, and must be what Cedar decides for it afresh; and a
    # near twin with one thing changed, which must not be served the original's decision.
    for x in (d, renamed(d, rng), renamed(d, rng), nudged(d, rng)):
        i = build(shared_engine, x)
        fresh = shared_engine.decide_uncached(i)
        served = shared_engine.decide(i)
        assert same(served, fresh), (x, served, fresh)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NARROW.flatmap(lambda d: st.fixed_dictionaries({
    **{k: st.just(v) for k, v in d.items()},
    "subject": READING_NAMES, "tenant": READING_NAMES, "rid": READING_NAMES,
    "owner": st.one_of(st.none(), st.tuples(READING_NAMES, READING_NAMES))})), st.randoms(use_true_random=False))
def test_renamed_twins_get_the_fresh_decision_when_policies_read_strings(
        reading_engine: PolicyEngine, d: dict[str, Any], rng: Any) -> None:
    # A twin that renames a subject `x1` (which `like "*x*"` matches) to `n7` is another
    # decision: the key keeps the subject, so the twin is evaluated, not served x1's.
    for x in (d, renamed(d, rng), renamed(d, rng), nudged(d, rng), nudged(d, rng)):
        i = build(reading_engine, x)
        fresh = reading_engine.decide_uncached(i)
        served = reading_engine.decide(i)
        assert same(served, fresh), (x, served, fresh)


def test_most_twins_are_served_by_shape(tmp_path: Path) -> None:
    # What makes the twin tests above worth something: a twin is usually answered from its
    # original's cache entry (and then must still equal the fresh decision).
    rng = random.Random(7)
    pool = ["alice", "bob", "acme", "u1", "u2", "t1"]
    eng = make_engine(tmp_path, decision_cache_size=100_000)
    served_by_shape = 0
    for _ in range(200):
        d = {"subject": rng.choice(pool), "tenant": rng.choice(pool), "path_tenant": rng.choice(pool),
             "roles": rng.choice([("editor",), ("viewer",)]), "route": rng.choice(["project", "list_projects"]),
             "write": rng.random() < 0.5, "rid": rng.choice(pool),
             "owner": (rng.choice(pool), rng.choice(pool)) if rng.random() < 0.8 else None,
             "ip": "10.0.0.1", "hour": "10:00", "scopes": frozenset({"projects"}), "method": rng.randrange(2)}
        eng.decide(build(eng, d))
        twin = build(eng, renamed(d, rng))
        before = eng.shape_hits
        served = eng.decide(twin)
        served_by_shape += eng.shape_hits - before
        assert same(served, eng.decide_uncached(twin))
    assert served_by_shape >= 150, served_by_shape


def test_distinct_users_hit_one_shape_of_the_shared_engine(shared_engine: PolicyEngine) -> None:
    # The property above is only worth something if cached decisions are served to inputs
    # other than the one that filled them: here 40 users on their own projects, one entry.
    eng = shared_engine
    before = eng.hits
    for n in range(40):
        eng.decide(inp(eng, f"user{n}", owner=Owner(f"user{n}", "acme"), rid=f"r{n}"))
    assert eng.hits - before >= 39
