"""From a request to a Cedar decision input: the contract operators write policies against.

Every decision asks Cedar "may PRINCIPAL do ACTION to RESOURCE in CONTEXT?", built as follows.

Principal
    ``User::"<tenant>/<subject>"`` for a person, ``Client::"<tenant>/<subject>"`` for a machine
    (an API key, or an OAuth client acting for itself: ``client_id == subject``). Attributes:
    ``subject``, ``tenant``, ``client_id`` (if any), ``credential_kind`` (``api_key``, ``jwt``,
    ``dpop``, ``opaque``...), ``scopes``, ``roles`` (every role held, after inheritance),
    ``clearance`` (0 public, 1 internal, 2 confidential, 3 restricted: the highest clearance
    among the roles, else ``policy.default_clearance``) and ``clearance_label``.
    The principal's parents are its roles: a role named in the principal's tenant
    (``policy.roles.tenants.<tenant>``) is ``Role::"<tenant>/<name>"``, else the global
    ``Role::"<name>"``. Inheritance is the roles' own parent relation, so
    ``principal in Role::"viewer"`` holds for an ``editor`` when editor inherits viewer.
    Role names containing ``/`` are ignored (they could name another tenant's role).

Action
    ``Action::"<route name>"``, one per route; a route may belong to action groups
    (``policy.action_groups``), e.g. ``action in Action::"admin"``. The method is in the
    context, since one route can serve several methods.

Resource
    With a ``policy.resources.<route>`` entry: ``<type>::"<value of id_param>"``; otherwise
    ``Route::"<route name>"`` (also when the id parameter is absent, e.g. a collection).
    Attributes: ``tenant`` (the owner source's tenant for the object if known, else the
    tenant path parameter), ``path_tenant`` (the tenant named in the path, if any),
    ``owner`` (from the owner source, if found), ``owned`` (the route has an owner source),
    ``sensitivity`` (label as a number, as clearance) and ``label``.

Context
    ``method``; ``write`` (not GET, HEAD or OPTIONS); ``hour``, ``minute``, ``weekday``
    (1 Monday .. 7 Sunday) in ``policy.business_hours.timezone``, and ``business_hours``;
    ``client_ip`` and ``networks`` (names of ``policy.networks`` containing it); ``country``
    (only when known); ``acr``, ``amr``, ``mfa``, ``phishing_resistant``; ``auth_age_minutes``
    (whole minutes since the user authenticated, only when known); ``dpop_bound`` and
    ``mtls_bound`` (the credential is sender-constrained); ``risk_score`` (0-100; 0 until
    detection exists) and ``high_risk`` (``risk_score >= policy.risk_threshold``).

Time enters decisions at minute granularity only, so a cached decision is reused within
the same minute and never outlives a business-hours boundary.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from portcullis.exchange import Principal
from portcullis.policy.config import (
    SENSITIVITY_LEVELS,
    WEEKDAYS,
    HeaderOwnerSourceConfig,
    PolicyConfig,
    ResourceConfig,
    role_name_ok,
)
from portcullis.policy.owners import Owner

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Authentication context classes of the built-in authorization server (oauth/models.py).
ACR_MFA = "urn:portcullis:acr:mfa"
ACR_PHISHING_RESISTANT = "urn:portcullis:acr:phr"
LIBRARY_DIR = Path(__file__).parent / "library"
BASE_SCHEMA = LIBRARY_DIR / "portcullis.cedarschema"
_LABELS = {v: k for k, v in SENSITIVITY_LEVELS.items()}
_json_dumps = json.JSONEncoder(separators=(",", ":")).encode


def compact_json(value: Any) -> str:
    """Compact JSON text, as `json.dumps(value, separators=(",", ":"))` but with non-ASCII
    left as UTF-8: orjson (entities and context are encoded per decision, ~5x faster),
    falling back to `json` for what orjson refuses (integers beyond 64 bits, non-string
    keys). Cedar reads both spellings alike."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _json_dumps(value)


_dumps = compact_json
MEMO_SIZE = 4096  # bound of each per-mapper memo (principals, client addresses)


class RouteLike(Protocol):
    """What the mapping needs of a route (`stages.route.RouteConfig` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def methods(self) -> list[str]: ...
    @property
    def tenant_param(self) -> str | None: ...
    @property
    def path(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DecisionInput:
    """One Cedar request and the per-request entities (principal, resource).

    ``entities_json`` and ``context_json`` are the whole entities and context as JSON;
    ``entity_jsons`` is each entity of ``entities`` as JSON (same order); ``key`` is the
    whole input as one string (the decision cache key, together with the engine
    generation). Treat the dicts as read-only: the mapping may share a principal's entity
    between inputs.
    """

    principal: dict[str, str]
    action: dict[str, str]
    resource: dict[str, str]
    context: dict[str, Any]
    entities: tuple[dict[str, Any], ...]
    entities_json: str
    context_json: str
    key: str
    entity_jsons: tuple[str, ...] = ()

    @staticmethod
    def make(principal: dict[str, str], action: dict[str, str], resource: dict[str, str],
             context: dict[str, Any], entities: Sequence[dict[str, Any]], *,
             entity_jsons: Sequence[str] | None = None) -> DecisionInput:
        """Serialize once; the key covers every field. ``entity_jsons``, if given, must be
        the compact JSON of each of ``entities`` (the mapping passes memoized ones)."""
        ejs = tuple(entity_jsons) if entity_jsons is not None else tuple(_dumps(e) for e in entities)
        if len(ejs) != len(entities):
            raise ValueError("entity_jsons must match entities")
        ents = "[" + ",".join(ejs) + "]"  # == compact json.dumps(list(entities))
        ctx = _dumps(context)
        key = "\x00".join((ents, action["id"], resource["type"], resource["id"], principal["type"],
                           principal["id"], ctx))
        return DecisionInput(principal, action, resource, context, tuple(entities), ents, ctx, key, ejs)

    def describe(self) -> str:
        """``User::"acme/alice" -> Action::"get" -> Project::"p1"`` for messages."""
        return (f'{self.principal["type"]}::{json.dumps(self.principal["id"])} -> '
                f'Action::{json.dumps(self.action["id"])} -> '
                f'{self.resource["type"]}::{json.dumps(self.resource["id"])}')


def principal_type(p: Principal) -> str:
    """``Client`` for machine credentials, else ``User``."""
    if p.credential_kind == "api_key" or (p.client_id is not None and p.client_id == p.subject):
        return "Client"
    return "User"


class RequestMapper:
    """Builds `DecisionInput`s; precomputes roles, clearances and networks from the config.

    Immutable after construction: a config change builds a new mapper.
    """

    def __init__(self, cfg: PolicyConfig, routes: Sequence[RouteLike]) -> None:
        self.cfg = cfg
        self.routes = {r.name: r for r in routes}
        self._tz = ZoneInfo(cfg.business_hours.timezone)
        self._days = frozenset(WEEKDAYS.index(d) + 1 for d in cfg.business_hours.days)
        bh = cfg.business_hours
        self._start = bh.start.hour * 60 + bh.start.minute
        self._end = bh.end.hour * 60 + bh.end.minute
        self._networks = [(name, [ipaddress.ip_network(c) for c in cidrs]) for name, cidrs in cfg.networks.items()]
        self._default_clearance = SENSITIVITY_LEVELS[cfg.default_clearance]
        # Role uid -> (parents' uids, own clearance or None); closure: uid -> (all uids, clearance).
        self._role_parents: dict[str, list[str]] = {}
        own_clearance: dict[str, int | None] = {}
        roles = cfg.roles
        for name, rc in roles.global_.items():
            self._role_parents[name] = list(rc.inherits)
            own_clearance[name] = SENSITIVITY_LEVELS[rc.clearance] if rc.clearance else None
        for tenant, troles in roles.tenants.items():
            for name, rc in troles.items():
                uid = f"{tenant}/{name}"
                self._role_parents[uid] = [f"{tenant}/{p}" if p in troles else p for p in rc.inherits]
                own_clearance[uid] = SENSITIVITY_LEVELS[rc.clearance] if rc.clearance else None
        self._closure: dict[str, tuple[frozenset[str], int | None]] = {}
        for uid in self._role_parents:
            seen: set[str] = set()
            stack = [uid]
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                stack.extend(self._role_parents.get(u, ()))
            levels = [c for u in seen if (c := own_clearance.get(u)) is not None]
            self._closure[uid] = (frozenset(seen), max(levels) if levels else None)
        self._groups: dict[str, list[str]] = {}
        for group, members in cfg.action_groups.items():
            for m in members:
                self._groups.setdefault(m, []).append(group)
        # Memos of pure functions of the config and their arguments (bounded; a config
        # change builds a new mapper, so they never outlive what they were derived from).
        self._memo_lock = threading.Lock()
        self._principals: dict[tuple[Any, ...], tuple[dict[str, str], dict[str, Any], str]] = {}
        self._nets: dict[str, tuple[str, ...]] = {}
        self._minute: tuple[int, int, int, int, bool] | None = None  # (utc minute, hour, minute, weekday, bh)

    # -- entities that do not change per request ---------------------------------

    def role_entities(self) -> list[dict[str, Any]]:
        """Every configured role with its parents: the base entity set."""
        return [{"uid": {"type": "Role", "id": uid}, "attrs": {},
                 "parents": [{"type": "Role", "id": p} for p in parents]}
                for uid, parents in self._role_parents.items()]

    def role_uid(self, tenant: str, name: str) -> str | None:
        """The Cedar id of role ``name`` for a principal of ``tenant`` (None: not a valid name)."""
        if not role_name_ok(name):
            return None
        if name in self.cfg.roles.tenants.get(tenant, {}):
            return f"{tenant}/{name}"
        return name

    # -- the request ---------------------------------------------------------------

    def build(
        self,
        principal: Principal,
        *,
        route: str,
        method: str,
        path_params: Mapping[str, str],
        client_ip: str,
        now: float,
        extra_roles: Iterable[str] = (),
        owner: Owner | None = None,
        risk_score: int = 0,
        country: str | None = None,
    ) -> DecisionInput:
        """The decision input for one request. ``extra_roles`` are roles granted outside
        the credential (just-in-time grants); ``owner`` is the owner source's answer."""
        p = principal
        extra = tuple(extra_roles)
        pkey = (p.tenant, p.subject, p.credential_kind, p.client_id, p.scopes, p.roles, extra,
                principal_type(p))
        cached = self._principals.get(pkey)
        if cached is None:
            cached = self._principal_entity(p, extra)
            self._remember(self._principals, pkey, cached)
        puid, principal_entity, pjson = cached

        # Resource.
        res_cfg: ResourceConfig | None = self.cfg.resources.get(route)
        r = self.routes.get(route)
        tenant_param = (res_cfg.tenant_param if res_cfg and res_cfg.tenant_param else None) or (
            r.tenant_param if r is not None else None)
        path_tenant = path_params.get(tenant_param) if tenant_param else None
        rid = path_params.get(res_cfg.id_param) if res_cfg and res_cfg.id_param else None
        if res_cfg is not None and rid is not None:
            rtype = res_cfg.type
        else:
            rtype, rid = "Route", route
        label = res_cfg.sensitivity if res_cfg is not None else "internal"
        rattrs: dict[str, Any] = {"owned": bool(res_cfg is not None and res_cfg.owner is not None
                                                and rtype != "Route"),
                                  "sensitivity": SENSITIVITY_LEVELS[label], "label": label}
        tenant = owner.tenant if owner is not None and owner.tenant is not None else path_tenant
        if tenant is not None:
            rattrs["tenant"] = tenant
        if path_tenant is not None:
            rattrs["path_tenant"] = path_tenant
        if owner is not None and rattrs["owned"]:
            rattrs["owner"] = owner.owner
        ruid = {"type": rtype, "id": rid}
        resource_entity = {"uid": ruid, "attrs": rattrs, "parents": []}

        # Context.
        hour, minute, weekday, business_hours = self._clock(now)
        amr = sorted(set(p.amr))
        acr = p.acr or ""
        mfa = acr in (ACR_MFA, ACR_PHISHING_RESISTANT) or "mfa" in amr
        phr = acr == ACR_PHISHING_RESISTANT or "hwk" in amr
        risk = max(0, min(100, int(risk_score)))
        m = method.upper()
        ctx: dict[str, Any] = {
            "method": m, "write": m not in SAFE_METHODS,
            "hour": hour, "minute": minute, "weekday": weekday,
            "business_hours": business_hours,
            "client_ip": client_ip, "networks": self.networks_of(client_ip),
            "acr": acr, "amr": amr, "mfa": mfa, "phishing_resistant": phr,
            "dpop_bound": p.cnf_jkt is not None, "mtls_bound": p.cnf_x5t is not None,
            "risk_score": risk, "high_risk": risk >= self.cfg.risk_threshold,
        }
        if country is not None:
            ctx["country"] = country
        if p.auth_time is not None:
            ctx["auth_age_minutes"] = max(0, math.floor((now - p.auth_time) / 60))
        return DecisionInput.make(puid, {"type": "Action", "id": route}, ruid, ctx,
                                  (principal_entity, resource_entity),
                                  entity_jsons=(pjson, _dumps(resource_entity)))

    def _principal_entity(self, p: Principal, extra_roles: tuple[str, ...]
                          ) -> tuple[dict[str, str], dict[str, Any], str]:
        """The principal's uid, entity and entity JSON (a function of the fields `build` keys
        its memo by)."""
        direct: list[str] = []
        for name in (*sorted(p.roles), *extra_roles):
            uid = self.role_uid(p.tenant, name)
            if uid is not None and uid not in direct:
                direct.append(uid)
        held: set[str] = set()
        levels: list[int] = []
        for uid in direct:
            closure = self._closure.get(uid)
            if closure is None:
                held.add(uid)
                continue
            held |= closure[0]
            if closure[1] is not None:
                levels.append(closure[1])
        clearance = max(levels) if levels else self._default_clearance
        pattrs: dict[str, Any] = {
            "subject": p.subject, "tenant": p.tenant, "credential_kind": p.credential_kind,
            "scopes": sorted(p.scopes), "roles": sorted(held),
            "clearance": clearance, "clearance_label": _LABELS[clearance],
        }
        if p.client_id is not None:
            pattrs["client_id"] = p.client_id
        puid = {"type": principal_type(p), "id": f"{p.tenant}/{p.subject}"}
        entity = {"uid": puid, "attrs": pattrs, "parents": [{"type": "Role", "id": u} for u in direct]}
        return puid, entity, _dumps(entity)

    def _clock(self, now: float) -> tuple[int, int, int, bool]:
        """(hour, minute, weekday, business_hours) at ``now`` in the business-hours zone,
        memoized for the current UTC minute when the zone's offset is whole minutes all
        through it (then every instant of the minute has the same local fields)."""
        utc_minute = math.floor(now / 60)
        memo = self._minute
        if memo is not None and memo[0] == utc_minute:
            return memo[1], memo[2], memo[3], memo[4]
        local = datetime.fromtimestamp(now, self._tz)
        minute_of_day = local.hour * 60 + local.minute
        weekday = local.isoweekday()
        bh = weekday in self._days and self._start <= minute_of_day < self._end
        first = datetime.fromtimestamp(utc_minute * 60, self._tz).utcoffset()
        last = datetime.fromtimestamp(utc_minute * 60 + 59.999, self._tz).utcoffset()
        if first is not None and first == last and first.total_seconds() % 60 == 0:
            self._minute = (utc_minute, local.hour, local.minute, weekday, bh)  # one atomic store
        return local.hour, local.minute, weekday, bh

    def _remember(self, memo: dict[Any, Any], key: Any, value: Any) -> None:
        with self._memo_lock:
            memo[key] = value
            while len(memo) > MEMO_SIZE:
                del memo[next(iter(memo))]  # oldest insertion first

    def networks_of(self, client_ip: str) -> list[str]:
        """Names of the configured networks containing ``client_ip`` (none if unparsable)."""
        hit = self._nets.get(client_ip)
        if hit is None:
            try:
                ip = ipaddress.ip_address(client_ip)
            except ValueError:
                hit = ()
            else:
                hit = tuple(name for name, nets in self._networks if any(ip in n for n in nets))
            self._remember(self._nets, client_ip, hit)
        return list(hit)

    def groups_of(self, route: str) -> list[str]:
        """The action groups a route belongs to."""
        return self._groups.get(route, [])


def generate_schema(cfg: PolicyConfig, routes: Sequence[RouteLike]) -> str:
    """The full Cedar schema for a config: the base types, each configured resource type,
    the action groups and one action per route. Operators may save and extend it."""
    out = [BASE_SCHEMA.read_text(encoding="utf-8").rstrip(), ""]
    types = sorted({res.type for res in cfg.resources.values()})
    for t in types:
        out.append(f"entity {t} = {{\n  tenant?: String,\n  path_tenant?: String,\n  owner?: String,\n"
                   "  owned: Bool,\n  sensitivity: Long,\n  label: String,\n};")
    out.append("")
    groups: dict[str, list[str]] = {}
    for group, members in cfg.action_groups.items():
        out.append(f"action {json.dumps(group)};")
        for m in members:
            groups.setdefault(m, []).append(group)
    for r in routes:
        res = cfg.resources.get(r.name)
        rtypes = ["Route"] if res is None else sorted({res.type, "Route"}) if res.id_param else ["Route"]
        member = f" in [{', '.join(json.dumps(g) for g in groups[r.name])}]" if r.name in groups else ""
        out.append(f"action {json.dumps(r.name)}{member} appliesTo {{\n  principal: [User, Client],\n"
                   f"  resource: [{', '.join(rtypes)}],\n  context: Context\n}};")
    return "\n".join(out) + "\n"


def template_params(template: str) -> list[str]:
    """The ``{name}`` parameters of a path template."""
    return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)


def check_routes(cfg: PolicyConfig, routes: Sequence[RouteLike]) -> list[str]:
    """Problems between the policy config and the routes, as ``path: message`` lines."""
    errors: list[str] = []
    by_name = {r.name: r for r in routes}
    for name, res in cfg.resources.items():
        at = f"policy.resources.{name}"
        r = by_name.get(name)
        if r is None:
            errors.append(f"{at}: no route is named {name!r}")
            continue
        params = set(template_params(r.path))
        if res.id_param is not None and res.id_param not in params:
            errors.append(f"{at}.id_param: {res.id_param!r} is not a parameter of {r.path!r}")
        if res.tenant_param is not None and res.tenant_param not in params:
            errors.append(f"{at}.tenant_param: {res.tenant_param!r} is not a parameter of {r.path!r}")
        if res.owner is not None and isinstance(cfg.owner_sources.get(res.owner), HeaderOwnerSourceConfig):
            unsafe = sorted(set(r.methods) - SAFE_METHODS)
            if unsafe:
                errors.append(f"{at}.owner: a 'header' owner source is known only after the upstream "
                              f"answered, so it cannot guard {', '.join(unsafe)}; use a 'table' or "
                              "'upstream' source for writes")
    for group, members in cfg.action_groups.items():
        if group in by_name:
            errors.append(f"policy.action_groups.{group}: the name is also a route (actions share one namespace)")
        for i, m in enumerate(members):
            if m not in by_name:
                errors.append(f"policy.action_groups.{group}[{i}]: no route is named {m!r}")
    return errors
