"""policy: Cedar RBAC + ABAC after the scope/role/tenant checks (DESIGN.md, step 5).

Runs the `PolicyEngine` (src/portcullis/policy/) on every non-public request: principal,
action (the route), resource (with its owner when the route has an owner source — BOLA,
OWASP API1) and context, mapped as `policy/mapping.py` documents. Roles granted through
governance (standing, just-in-time, break-glass) join the principal's own. The determining
policies land in the audit event (``extra["policy"]``); a deny is 403, an engine error or
an owner lookup that cannot be answered denies too (fail closed).

Owners named by the upstream's response (a ``header`` source, safe methods only) are
known only afterwards: the request is decided without an owner, then decided again on the
response with it, and a deny replaces the upstream's answer before anything is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, Protocol

from portcullis.exchange import Exchange, Principal, UpstreamResponse
from portcullis.policy.config import PolicyConfig, ResourceConfig
from portcullis.policy.engine import Decision, PolicyEngine, decision_facts
from portcullis.policy.owners import AnyOwnerSource, HeaderOwnerSource, Owner, OwnerLookupError
from portcullis.problems import Problem

log = logging.getLogger("portcullis.policy")


class RoleSource(Protocol):
    """Extra roles held now (governance: standing, JIT, break-glass assignments)."""

    def active_roles(self, tenant: str, principal_id: str, now: float | None = None) -> frozenset[str]: ...


def _denied(d: Decision) -> Problem:
    if d.errors:
        return Problem(403, "forbidden", "policy.error", "The request could not be authorized.")
    return Problem(403, "forbidden", d.reason, "A policy does not allow this request.")


class PolicyStage:
    """Decides each request with Cedar; see the module docstring."""

    name: ClassVar[str] = "policy"

    def __init__(self, engine: PolicyEngine, cfg: PolicyConfig, owners: dict[str, AnyOwnerSource],
                 roles: RoleSource | None = None, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._resources: dict[str, ResourceConfig] = dict(cfg.resources)
        self._owners = owners
        self._roles = roles
        self._clock = clock

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        p = ex.principal
        if route is None or route.config.public:
            return None
        if p is None:  # authorize refuses this first; fail closed regardless
            return Problem(401, "unauthenticated", "policy.no_principal", "This route requires a credential.")
        owner: Owner | None = None
        rc = self._resources.get(route.name)
        source = self._owners.get(rc.owner) if rc is not None and rc.owner else None
        if rc is not None and source is not None and not source.deferred and rc.id_param in ex.path_params:
            # The tenant the object is looked up under: the resource's own tenant parameter,
            # else the route's (as the request mapping does).
            tparam = rc.tenant_param or route.config.tenant_param
            tenant = ex.path_params.get(tparam) if tparam else None
            try:
                owner = await source.lookup(rc.type, ex.path_params[rc.id_param], tenant)
            except OwnerLookupError as exc:
                log.warning("owner lookup failed for route %s: %s", route.name, exc)
                ex.facts["policy"] = {"policy_decision": "deny", "policy_reason": "policy.owner_unavailable"}
                return Problem(503, "service-unavailable", "policy.owner_unavailable",
                               "The request cannot be authorized right now; retry shortly.",
                               headers=[(b"retry-after", b"1")])
        deferred = isinstance(source, HeaderOwnerSource) and rc is not None and rc.id_param in ex.path_params
        if deferred:
            # The owner is named only by the upstream's answer. Decide now as if the caller
            # owned the object — the most ownership can ever allow — so every other rule
            # (roles, tenant, time, MFA...) still refuses early; the decision that counts is
            # made again on the answer, with the real owner, before anything is sent.
            owner = Owner(p.subject, None)
        d = self._decide(ex, p, owner)
        if not d.allowed:
            return _denied(d)
        if deferred:
            ex.facts["policy_deferred"] = True
        return None

    def _decide(self, ex: Exchange, p: Principal, owner: Owner | None) -> Decision:
        assert ex.route is not None
        now = self._clock()
        extra = self._roles.active_roles(p.tenant, p.subject, now) if self._roles is not None else frozenset()
        inp = self._engine.build_input(p, route=ex.route.name, method=ex.method, path_params=ex.path_params,
                                       client_ip=ex.client_ip, now=now, extra_roles=extra, owner=owner)
        d = self._engine.decide(inp)
        ex.facts["policy"] = decision_facts(d)
        return d

    async def on_response(self, ex: Exchange) -> None:
        """Decide again with the owner the upstream names (header sources only)."""
        if not ex.facts.get("policy_deferred") or ex.upstream is None or ex.principal is None:
            return
        assert ex.route is not None
        rc = self._resources[ex.route.name]
        source = self._owners[rc.owner or ""]
        assert isinstance(source, HeaderOwnerSource)
        up = ex.upstream
        if up.status >= 400:  # an error carries none of the resource's data: pass it on
            return
        try:
            owner = source.from_headers(up.headers)
        except OwnerLookupError:
            owner = None
        if owner is None:
            # Fail closed: a successful answer about an owned object must name its owner,
            # exactly once; otherwise nobody can say whether the caller may see it.
            ex.facts["policy"] = {"policy_decision": "deny", "policy_reason": "policy.owner_ambiguous"}
            problem = Problem(502, "bad-gateway", "policy.owner_ambiguous",
                              "The upstream answer could not be delivered.")
        else:
            d = self._decide(ex, ex.principal, owner)
            if d.allowed:
                return
            problem = _denied(d)
        if up.release is not None:
            up.release()  # the upstream body is never sent: give the connection back now
        body = problem.body(ex.request_id)
        ex.decision, ex.reason = "deny", problem.reason
        ex.upstream = UpstreamResponse(problem.status, [
            (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")], _once(body), content_length=len(body))


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
