"""authorize: required scopes, roles and tenant binding (DESIGN.md, step 5).

Deny by default: a non-public route with no principal never gets past here. Tenant
binding comes first — a credential of one tenant gets 403 on another tenant's paths
whatever its scopes (DEMO.md) — then scopes (RFC 6750 §3.1 ``insufficient_scope``,
403), then roles.
"""

from __future__ import annotations

from typing import ClassVar

from portcullis.exchange import Exchange
from portcullis.problems import Problem, bearer_challenge


class AuthorizeStage:
    """Checks the route's requirements against the principal."""

    name: ClassVar[str] = "authorize"

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return Problem(500, "internal-error", "authz.no_route", "The request could not be routed.")
        cfg = route.config
        if cfg.public:
            return None
        p = ex.principal
        if p is None:  # fail closed: authenticate must have produced a principal
            return Problem(401, "unauthenticated", "authz.no_principal", "This route requires a credential.",
                           headers=[bearer_challenge()])
        if cfg.tenant_param is not None and ex.path_params.get(cfg.tenant_param) != p.tenant:
            return Problem(403, "tenant-mismatch", "authz.tenant_mismatch",
                           "The credential does not belong to this tenant.")
        missing = [s for s in cfg.scopes if s not in p.scopes]
        if missing:
            need = " ".join(cfg.scopes)
            return Problem(403, "insufficient-scope", "authz.scope_missing",
                           f"This route requires the scopes: {need}.",
                           headers=[bearer_challenge("insufficient_scope", scope=need)])
        if cfg.roles and not any(r in p.roles for r in cfg.roles):
            return Problem(403, "forbidden", "authz.role_missing",
                           "The credential lacks a role this route requires.")
        return None
