"""The engine's speed work must not change a decision: attribute trimming, the entity
handle LRUs, the native Cedar call and the mapping's memos are checked against the plain
paths they replace."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import cedarpy
import pytest

from portcullis.exchange import Principal
from portcullis.policy import engine as engine_mod
from portcullis.policy.engine import AttributeUse, PolicyEngine, action_ancestors, attribute_use, build_slice
from portcullis.policy.mapping import DecisionInput, RequestMapper
from portcullis.policy.owners import Owner
from portcullis.policy.testing import load_setup

from .helpers import PERMIT_ALL, ROUTES, WEDNESDAY_10, at, cfg, engine, principal

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "policies"


def _ps(text: str) -> cedarpy.PolicySet:
    return cedarpy.PolicySet.from_str(text)


# -- which attributes a policy set can observe ---------------------------------------

def test_attribute_use_names_context_keys_and_entity_attributes() -> None:
    use = attribute_use(_ps('permit (principal, action, resource) when { context.write && '
                            'resource has owner && resource.owner == principal.subject };'))
    assert use.context == frozenset({"write"})
    assert use.attrs == frozenset({"write", "owner", "subject"})


def test_attribute_use_nested_has_and_access() -> None:
    use = attribute_use(_ps('permit (principal, action, resource) when { context has a.b && principal.x.y == 1 };'))
    assert use.context == frozenset({"a"})
    assert use.attrs is not None and {"a", "b", "x", "y"} <= use.attrs


@pytest.mark.parametrize("text", [
    'permit (principal, action, resource) when { context == {"write": true} };',
    'permit (principal, action, resource) when { [context].contains({}) };',
    'permit (principal, action, resource) when { (if true then context else {}) has write };',
])
def test_attribute_use_keeps_whole_context_when_context_itself_is_used(text: str) -> None:
    assert attribute_use(_ps(text)).context is None


def test_attribute_use_gives_up_on_tags() -> None:
    use = attribute_use(_ps('permit (principal, action, resource) when { principal.hasTag("a") };'))
    assert use == AttributeUse(None, None)


def test_attribute_use_without_policies_sends_nothing() -> None:
    assert attribute_use(_ps("")) == AttributeUse(frozenset(), frozenset())


# -- trimmed decisions equal untrimmed ones ----------------------------------------------

def _inputs(eng: PolicyEngine) -> list[DecisionInput]:
    out = []
    subjects = [("vera", "acme", ("viewer",)), ("eddie", "acme", ("editor",)), ("ann", "acme", ("admin",)),
                ("bill", "acme", ("billing",)), ("aud", "acme", ("auditor",)), ("gina", "globex", ("editor",)),
                ("nobody", "acme", ()), ("alice", "acme", ("editor",))]
    routes = [("list_projects", {"tenant": "acme"}), ("project", {"tenant": "acme", "id": "p1"}),
              ("project", {"tenant": "globex", "id": "g1"}), ("project", {"tenant": "acme", "id": "zz"}),
              ("tenant_users", {"tenant": "acme"}), ("invoices", {"tenant": "acme"}),
              ("audit_export", {"tenant": "acme"})]
    owners = {"p1": Owner("alice", "acme"), "g1": Owner("gina", "globex")}
    amrs = [("", ()), ("urn:portcullis:acr:mfa", ("pwd", "otp")), ("", ("hwk",))]
    times = [at("2025-03-05 10:00"), at("2025-03-05 20:00"), at("2025-03-08 10:00")]
    for (sub, ten, roles), (route, params), method, ip, (acr, amr), now, risk in itertools.product(
            subjects, routes, ["GET", "PUT", "POST", "DELETE"], ["10.1.2.3", "192.0.2.7"], amrs, times, [0, 90]):
        r = next(x for x in eng._routes if x.name == route)
        if method not in r.methods:
            continue
        p = Principal(subject=sub, tenant=ten, credential_id="k", credential_kind="jwt", scopes=frozenset({"s"}),
                      roles=frozenset(roles), acr=acr, amr=amr, auth_time=now - 300)
        out.append(eng.build_input(p, route=route, method=method, path_params=params, client_ip=ip, now=now,
                                   owner=owners.get(params.get("id", "")), risk_score=risk))
    return out


def test_trimmed_decisions_equal_full_decisions_over_examples() -> None:
    c, routes = load_setup(EXAMPLES / "policy.yaml")
    fast = PolicyEngine(c, routes, EXAMPLES)
    full = PolicyEngine(c, routes, EXAMPLES)
    full._state.use = AttributeUse(None, None)  # every attribute, every context key
    full._state.nodes = None  # the whole policy set for every action
    assert fast._state.use.context is not None and "client_ip" not in fast._state.use.context
    assert fast._state.nodes is not None
    inputs = _inputs(fast)
    assert len(inputs) > 4000
    allowed = 0
    for inp in inputs:
        a, b = fast.decide_uncached(inp), full.decide_uncached(inp)
        assert (a.allowed, a.policies, a.errors) == (b.allowed, b.policies, b.errors), inp.describe()
        allowed += a.allowed
    assert 0 < allowed < len(inputs)  # both outcomes exercised


def test_native_call_agrees_with_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    c, routes = load_setup(EXAMPLES / "policy.yaml")
    eng = PolicyEngine(c, routes, EXAMPLES)
    inputs = _inputs(eng)[::7]
    native = [eng.decide_uncached(i) for i in inputs]
    monkeypatch.setattr(engine_mod, "_native_is_authorized", None)
    eng._state.pairs.clear()
    public = [eng.decide_uncached(i) for i in inputs]
    assert [(d.allowed, d.policies, d.errors) for d in native] == [(d.allowed, d.policies, d.errors) for d in public]


# -- entity handle LRUs ------------------------------------------------------------------

def _get(eng: PolicyEngine, p: Principal, rid: str = "p1", ip: str = "10.0.0.1",
         owner: Owner | None = None) -> DecisionInput:
    return eng.build_input(p, route="project", method="GET", path_params={"tenant": "acme", "id": rid},
                           client_ip=ip, now=WEDNESDAY_10, owner=owner)


def test_pair_handles_are_reused_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_PAIR_ENTITIES", 3)
    monkeypatch.setattr(engine_mod, "MAX_PRINCIPAL_ENTITIES", 2)
    eng = engine(tmp_path)
    st = eng._state
    eng.decide_uncached(_get(eng, principal()))
    eng.decide_uncached(_get(eng, principal(), ip="192.0.2.1"))  # other context, same entities
    assert len(st.pairs) == 1 and len(st.principals) == 1
    for i in range(10):
        eng.decide_uncached(_get(eng, principal(subject=f"u{i}"), rid=f"r{i}"))
    assert len(st.pairs) == 3 and len(st.principals) == 2


def test_entities_differing_in_a_named_attribute_do_not_share_a_handle(tmp_path: Path) -> None:
    text = ('@id("own")\npermit (principal, action, resource)\n'
            'when { resource has owner && resource.owner == principal.subject };\n')
    eng = engine(tmp_path, {"ops.cedar": text})
    alice, bob = principal("alice"), principal("bob")
    owner = Owner("alice", "acme")
    assert eng.decide_uncached(_get(eng, alice, owner=owner)).allowed  # p1 is alice's
    assert not eng.decide_uncached(_get(eng, bob, owner=owner)).allowed
    # Same principal, resource with and without a known owner.
    mine = eng.build_input(alice, route="project", method="GET", path_params={"tenant": "acme", "id": "p1"},
                           client_ip="10.0.0.1", now=WEDNESDAY_10, owner=Owner("alice", "acme"))
    none = eng.build_input(alice, route="project", method="GET", path_params={"tenant": "acme", "id": "p1"},
                           client_ip="10.0.0.1", now=WEDNESDAY_10, owner=None)
    assert eng.decide_uncached(mine).allowed and not eng.decide_uncached(none).allowed


def test_new_generation_starts_with_empty_entity_caches(tmp_path: Path) -> None:
    text = '@id("viewers")\npermit (principal in Role::"viewer", action, resource);\n'
    eng = engine(tmp_path, {"ops.cedar": text})
    inp = _get(eng, principal(roles=("editor",)))
    assert eng.decide_uncached(inp).allowed  # editor inherits viewer
    old = eng._state
    assert old.pairs
    roles = {"global": {"viewer": {}, "editor": {}, "admin": {"inherits": ["editor"]}}}
    assert eng.update(cfg(roles=roles)).ok
    assert eng._state is not old and not eng._state.pairs
    assert not eng.decide_uncached(_get(eng, principal(roles=("editor",)))).allowed  # no longer inherits


# -- mapping memos -------------------------------------------------------------------------

def test_principal_memo_keys_on_every_field_that_shapes_the_entity() -> None:
    m = RequestMapper(cfg(), ROUTES)
    def ent(p: Principal, extra: tuple[str, ...] = ()) -> dict[str, object]:
        return m.build(p, route="list_projects", method="GET", path_params={"tenant": "acme"},
                       client_ip="10.0.0.1", now=WEDNESDAY_10, extra_roles=extra).entities[0]
    base = ent(principal())
    assert ent(principal()) == base
    assert ent(principal(roles=("admin",)))["attrs"]["clearance"] == 3  # type: ignore[index]
    assert ent(principal(), ("admin",))["attrs"]["clearance"] == 3  # type: ignore[index]
    assert ent(principal(scopes=frozenset({"x"})))["attrs"]["scopes"] == ["x"]  # type: ignore[index]
    assert ent(principal(tenant="globex"))["uid"] == {"type": "User", "id": "globex/alice"}
    assert ent(principal(credential_kind="api_key"))["uid"]["type"] == "Client"  # type: ignore[index]
    assert ent(principal(client_id="alice"))["uid"]["type"] == "Client"  # type: ignore[index]
    assert ent(principal())["attrs"]["clearance"] == 2  # type: ignore[index]


def test_networks_memo_hands_out_copies() -> None:
    m = RequestMapper(cfg(), ROUTES)
    first = m.networks_of("10.9.9.9")
    first.append("evil")
    assert m.networks_of("10.9.9.9") == ["office"]
    assert m.networks_of("not-an-ip") == []


def test_entity_jsons_match_entities() -> None:
    m = RequestMapper(cfg(), ROUTES)
    inp = m.build(principal(), route="project", method="GET", path_params={"tenant": "acme", "id": "p1"},
                  client_ip="10.0.0.1", now=WEDNESDAY_10, owner=Owner("alice", "acme"))
    assert [json.loads(j) for j in inp.entity_jsons] == list(inp.entities)
    assert json.loads(inp.entities_json) == list(inp.entities)
    assert inp.entities_json == json.dumps(list(inp.entities), separators=(",", ":"))
    with pytest.raises(ValueError):
        DecisionInput.make(inp.principal, inp.action, inp.resource, inp.context, inp.entities, entity_jsons=())


@pytest.mark.parametrize(("zone", "start", "seconds"), [
    ("Europe/Berlin", "2025-03-30 01:58", 240),     # DST starts: 02:00 -> 03:00
    ("Europe/Berlin", "2025-10-26 02:58", 240),     # DST ends (first 02:58, UTC+2)
    ("Australia/Lord_Howe", "2025-04-06 01:28", 240),  # a 30-minute DST shift
    ("Africa/Monrovia", "1971-12-31 23:58", 240),   # offset -0:44:30 until 1972: not whole minutes
    ("Asia/Kathmandu", "2025-06-01 07:58", 240),    # +05:45
])
def test_clock_memo_matches_the_zone_second_by_second(zone: str, start: str, seconds: int) -> None:
    c = cfg(business_hours={"timezone": zone, "start": "08:00", "end": "17:00"})
    m = RequestMapper(c, ROUTES)
    tz = ZoneInfo(zone)
    t0 = datetime.fromisoformat(start).replace(tzinfo=tz).timestamp()
    for i in range(seconds * 4):
        now = t0 + i * 0.25
        ctx = m.build(principal(), route="list_projects", method="GET", path_params={"tenant": "acme"},
                      client_ip="10.0.0.1", now=now).context
        local = datetime.fromtimestamp(now, tz)
        mod = local.hour * 60 + local.minute
        assert (ctx["hour"], ctx["minute"], ctx["weekday"]) == (local.hour, local.minute, local.isoweekday()), now
        assert ctx["business_hours"] == (local.isoweekday() <= 5 and 8 * 60 <= mod < 17 * 60)


def test_permit_all_engine_still_allows(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": PERMIT_ALL})
    assert eng._state.use == AttributeUse(frozenset(), frozenset())
    d = eng.decide(_get(eng, principal()))
    assert d.allowed and d.policies == ("permit-all",)


# -- slicing by action -------------------------------------------------------------------

def test_action_ancestors_follow_groups() -> None:
    c, routes = load_setup(EXAMPLES / "policy.yaml")
    st = PolicyEngine(c, routes, EXAMPLES)._state
    anc = action_ancestors(st.base)
    assert anc["tenant_users"] == frozenset({"admin"}) and anc["invoices"] == frozenset({"billing"})
    assert anc["project"] == frozenset()


def test_slice_keeps_exactly_the_policies_that_can_apply() -> None:
    c, routes = load_setup(EXAMPLES / "policy.yaml")
    st = PolicyEngine(c, routes, EXAMPLES)._state
    def labels(action: str) -> set[str]:
        text = str(build_slice(st, action).policies)
        return {pi.label for pi in st.info.values() if f'@id("{pi.label}")' in text}
    everywhere = {"portcullis.tenant_isolation", "portcullis.tenant_isolation.path", "portcullis.owner_only_writes",
                  "portcullis.block_high_risk", "portcullis.sensitivity_clearance", "viewers-read",
                  "writes-need-mfa-off-site"}
    assert labels("project") == everywhere | {"editors-write-projects"}
    assert labels("tenant_users") == everywhere | {"admins-manage-users", "portcullis.admin_business_hours"}
    assert labels("invoices") == everywhere | {"portcullis.phishing_resistant_billing"}
    # Only the keys the slice's policies name reach Cedar.
    assert build_slice(st, "project").context == frozenset({"write", "networks", "mfa", "high_risk"})
    assert "business_hours" in (build_slice(st, "tenant_users").context or ())


def test_sliced_errors_and_reasons_keep_cedars_policy_ids(tmp_path: Path) -> None:
    # The overflow forbid applies to one action only and sits after other policies: a
    # renumbered slice would name another policy in its error.
    text = (PERMIT_ALL + '@id("reads")\npermit (principal, action == Action::"tenant_users", resource);\n'
            '@id("overflow")\nforbid (principal, action == Action::"list_projects", resource)\n'
            '  when { context.risk_score * 9223372036854775807 * 2 > 0 };\n')
    fast = engine(tmp_path, {"ops.cedar": text})
    full = engine(tmp_path, {"ops.cedar": text})
    full._state.nodes = None
    for route in ("list_projects", "tenant_users", "project"):
        params = {"tenant": "acme", "id": "p1"} if route == "project" else {"tenant": "acme"}
        inp = fast.build_input(principal(), route=route, method="GET", path_params=params, client_ip="10.0.0.1",
                               now=WEDNESDAY_10, risk_score=1)
        a, b = fast.decide_uncached(inp), full.decide_uncached(inp)
        assert (a.allowed, a.policies, a.errors) == (b.allowed, b.policies, b.errors)
    assert fast._state.slices["list_projects"].policies is not fast._state.policies
    err = fast.decide_uncached(fast.build_input(principal(), route="list_projects", method="GET",
                                                path_params={"tenant": "acme"}, client_ip="10.0.0.1",
                                                now=WEDNESDAY_10, risk_score=1))
    assert not err.allowed and "policy2" in err.errors[0] and "overflow" in err.errors[0]


def test_unknown_action_type_uses_the_whole_set(tmp_path: Path) -> None:
    eng = engine(tmp_path, {"ops.cedar": PERMIT_ALL})
    sl = eng._slice(eng._state, {"type": "Other", "id": "x"})
    assert sl.policies is eng._state.policies
    assert eng._slice(eng._state, {"type": "Action", "id": "not-a-route"}).policies is eng._state.policies
    assert "not-a-route" not in eng._state.slices  # only the schema's actions are kept


def test_slice_that_cannot_be_built_falls_back_to_the_whole_set(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = PERMIT_ALL + '@id("admins")\npermit (principal, action in Action::"admin", resource);\n'
    eng = engine(tmp_path, {"ops.cedar": text})

    def broken(_: object) -> cedarpy.PolicySet:
        raise ValueError("cannot")

    monkeypatch.setattr(cedarpy.PolicySet, "from_pst", broken)
    d = eng.decide_uncached(eng.build_input(principal(), route="list_projects", method="GET",
                                            path_params={"tenant": "acme"}, client_ip="10.0.0.1", now=WEDNESDAY_10))
    assert d.allowed and not d.errors
    assert eng._state.slices["list_projects"].policies is eng._state.policies


def test_compact_json_matches_json_and_falls_back_where_orjson_refuses() -> None:
    import json

    from portcullis.policy.mapping import compact_json

    doc = {"a": [1, 2.5, True, None], "b": "x y", "c": {"d": "é≠"}}
    assert json.loads(compact_json(doc)) == doc
    assert compact_json({"a": [1, "b"]}) == json.dumps({"a": [1, "b"]}, separators=(",", ":"))
    big = {"n": 2**70}
    assert compact_json(big) == '{"n":' + str(2**70) + "}"  # beyond 64 bits: the json fallback
    assert json.loads(compact_json({1: "x"})) == {"1": "x"}  # a non-string key: the fallback too
