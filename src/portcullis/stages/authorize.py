"""authorize: required scopes, roles and tenant binding (DESIGN.md, step 5).

Deny by default: a non-public route with no principal never gets past here. Tenant
binding comes first — a credential of one tenant gets 403 on another tenant's paths
whatever its scopes (DEMO.md) — then scopes (RFC 6750 §3.1 ``insufficient_scope``,
403), then roles, then step-up (RFC 9470): a route's `acr_values` / `max_auth_age_seconds`
against the token's `acr` / `auth_time`, refused with 401 and the
``insufficient_user_authentication`` challenge naming what to ask the authorization
server for (§3), so the client sends the user back with `acr_values` / `max_age`.
"""

from __future__ import annotations

from typing import ClassVar

from portcullis.credentials.acr import acr_satisfies
from portcullis.exchange import Exchange, Principal
from portcullis.problems import Problem, bearer_challenge
from portcullis.stages.route import RouteConfig


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
        if cfg.acr_values or cfg.max_auth_age_seconds is not None:
            return step_up(cfg, p, ex.started_wall)
        return None


def step_up(cfg: RouteConfig, p: Principal, now: float) -> Problem | None:
    """RFC 9470 §3: refuse a token whose authentication is too weak or too old.

    The `acr` passes when it equals one of the route's values or is at least as strong
    as one of them (`acr_satisfies`); an unknown `auth_time` is too old.
    """
    weak = bool(cfg.acr_values) and not any(p.acr == want or acr_satisfies(p.acr, want) for want in cfg.acr_values)
    max_age = cfg.max_auth_age_seconds
    old = max_age is not None and (p.auth_time is None or now - p.auth_time > max_age)
    if not (weak or old):
        return None
    detail = ("A stronger authentication is required." if weak
              else "A more recent authentication is required.")
    parts = ['realm="portcullis"', 'error="insufficient_user_authentication"', f'error_description="{detail}"']
    if cfg.acr_values:
        parts.append(f'acr_values="{" ".join(cfg.acr_values)}"')
    if max_age is not None:
        parts.append(f"max_age={max_age}")
    scheme = "DPoP" if p.cnf_jkt else "Bearer"
    return Problem(401, "insufficient-user-authentication",
                   "authz.acr_too_weak" if weak else "authz.auth_too_old", detail,
                   headers=[(b"www-authenticate", f"{scheme} {', '.join(parts)}".encode())])
