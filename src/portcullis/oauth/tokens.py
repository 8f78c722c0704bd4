"""The token side of the authorization server: signing keys, client authentication,
the token endpoint with the client credentials grant, DPoP and certificate binding,
introspection, revocation, JWKS and discovery.

`install(ctx)` sets `ctx.keys` (a `Keyring`) and registers on `ctx.server` the JWT
access token generator (every grant uses it), the client authentication methods, the
client credentials grant and the introspection and revocation endpoints; on
`ctx.routes` the endpoints below; on `ctx.startup` the key maintenance task.

=========================================  ============================================
``POST /oauth2/token``                     RFC 6749 §3.2, §4.4; RFC 9449; RFC 8705
``GET /oauth2/jwks``                       RFC 7517 JWK Set
``POST /oauth2/introspect``                RFC 7662
``POST /oauth2/revoke``                    RFC 7009
``GET /.well-known/oauth-authorization-server``  RFC 8414
``GET /.well-known/openid-configuration``  OpenID Connect Discovery 1.0
=========================================  ============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749 import InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.util import scope_to_list

from portcullis.oauth.client_auth import CONFIDENTIAL_METHODS, ClientAuthenticator, presented_methods
from portcullis.oauth.discovery import Discovery
from portcullis.oauth.dpop import TokenEndpointDpop, bind_certificate
from portcullis.oauth.http import FORM, AsRequest, AsResponse, oauth_error
from portcullis.oauth.keys import Keyring, KeyringJwks, issuer_config
from portcullis.oauth.models import Client
from portcullis.oauth.rfc7009 import Revocation
from portcullis.oauth.rfc7662 import Introspection, OwnAccessTokens, RevocationSnapshot
from portcullis.oauth.rfc9068 import AccessTokenIssuer, InvalidTargetError, bind_request, validate_resources
from portcullis.oauth.server import AuthorizationServer, OAuthRequest

if TYPE_CHECKING:
    from portcullis.oauth.service import AuthContext

log = logging.getLogger("portcullis.oauth.tokens")

#: Key maintenance (scheduled rotation, dropping expired retired keys) runs this often.
MAINTENANCE_SECONDS = 60.0
NO_CACHE = [("Cache-Control", "no-store"), ("Pragma", "no-cache")]


class ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    """RFC 6749 §4.4 for confidential clients, scope limited to the client's own.

    §3.3: an omitted scope means the client's registered scopes; a scope beyond them
    is refused with ``invalid_scope`` (never silently narrowed)."""

    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_METHODS

    def validate_requested_scope(self) -> None:
        client: Client = self.request.client
        requested = scope_to_list(self.request.payload.scope or "") or []
        if not requested:
            granted = list(client.scopes)
        else:
            if not set(requested) <= set(client.scopes):
                raise InvalidScopeError(description="The requested scope exceeds the client's scopes.")
            granted = list(dict.fromkeys(requested))
        self.request.as_request.audit["scope"] = " ".join(granted)
        self._granted = " ".join(granted)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        # §4.4.3: "A refresh token SHOULD NOT be included."
        token: dict[str, Any] = self.generate_token(scope=self._granted, include_refresh_token=False)
        self.save_token(token)
        return 200, token, list(self.TOKEN_RESPONSE_HEADER)


def _require_dpop(*, client: Client, grant: Any, **_: Any) -> None:
    """RFC 9449 §5.2 (`dpop_bound_access_tokens`): such a client's token requests
    without a DPoP proof are refused."""
    request: OAuthRequest = grant.request
    if client.require_dpop and request.dpop_jkt is None:
        request.as_request.audit["failure"] = "oauth.dpop.required"
        raise InvalidRequestError(description="This client must send a DPoP proof.")


def _form_error(req: AsRequest, *, allow_repeats: frozenset[str] = frozenset()) -> AsResponse | None:
    """Token-side requests are POSTed forms, parameters in the body only, none repeated
    (RFC 6749 §3.2 and §3.1; RFC 7662 §2.1; RFC 7009 §2.1)."""
    if req.query:
        return oauth_error("invalid_request", "Parameters belong in the request body.",
                           reason="oauth.query_parameters", headers=NO_CACHE)
    if req.content_type != FORM:
        return oauth_error("invalid_request", f"The body must be {FORM}.", reason="oauth.content_type",
                           headers=NO_CACHE)
    for k, vs in req.form.items():
        if len(vs) > 1 and k not in allow_repeats:
            return oauth_error("invalid_request", f"Parameter {k[:40]} is repeated.", reason="oauth.repeated_parameter",
                               headers=NO_CACHE)
    if len(presented_methods(req)) > 1:
        # RFC 6749 §2.3: "The client MUST NOT use more than one authentication method in each request."
        return oauth_error("invalid_request", "Use exactly one client authentication method.",
                           reason="oauth.client_auth.multiple_methods", headers=NO_CACHE)
    return None


class TokenEndpoints:
    """The HTTP handlers; everything they use is built by `install`."""

    def __init__(self, ctx: AuthContext, keyring: Keyring, dpop: TokenEndpointDpop, discovery: Discovery) -> None:
        self._ctx = ctx
        self._server: AuthorizationServer = ctx.server
        self._keyring = keyring
        self._dpop = dpop
        self._discovery = discovery

    def _finish(self, req: AsRequest, resp: AsResponse) -> AsResponse:
        """Uniform client-authentication failures, no-store headers and audit facts."""
        if resp.reason == "oauth.invalid_client":
            # RFC 6749 §5.2: 401, with a challenge for the scheme (Basic) clients use; one
            # description for every cause, the cause only in the audit event.
            resp = oauth_error("invalid_client", "Client authentication failed.", 401,
                               reason=req.audit.pop("failure", "oauth.client_auth.no_credentials"),
                               headers=[("WWW-Authenticate", f'Basic realm="{self._ctx.cfg.issuer}"')])
        elif resp.status >= 400 and "failure" in req.audit:
            resp.reason = req.audit.pop("failure")
        names = {k.lower() for k, _ in resp.headers}
        resp.headers.extend(h for h in NO_CACHE if h[0].lower() not in names)
        return resp

    async def token(self, req: AsRequest) -> AsResponse:
        bad = _form_error(req, allow_repeats=frozenset({"resource"}))  # RFC 8707 §2: resource may repeat
        if bad is not None:
            return bad
        grant_type = req.form.get("grant_type", [""])[0]
        req.audit["grant_type"] = grant_type[:64]
        oreq = self._server.create_oauth2_request(req)
        try:
            oreq.resources = validate_resources(self._ctx.cfg, req.form.get("resource", []))
        except InvalidTargetError as exc:
            return self._finish(req, oauth_error("invalid_target", str(exc.description), reason="oauth.invalid_target"))
        bind_certificate(oreq)
        refused = await self._dpop.check_shared(oreq)
        if refused is not None:
            return self._finish(req, refused)
        with bind_request(oreq):
            resp: AsResponse = self._server.create_token_response(oreq)
        if resp.status == 200:
            resp.headers.extend(self._dpop.nonce_headers())
            if oreq.client is not None:
                req.audit["client_id"] = oreq.client.client_id
        return self._finish(req, resp)

    async def introspect(self, req: AsRequest) -> AsResponse:
        bad = _form_error(req)
        if bad is not None:
            return bad
        resp: AsResponse = self._server.create_endpoint_response("introspection", OAuthRequest(req))
        return self._finish(req, resp)

    async def revoke(self, req: AsRequest) -> AsResponse:
        bad = _form_error(req)
        if bad is not None:
            return bad
        resp: AsResponse = self._server.create_endpoint_response("revocation", OAuthRequest(req))
        return self._finish(req, resp)

    async def jwks(self, req: AsRequest) -> AsResponse:
        return AsResponse(200, self._keyring.jwks_json(), [
            ("content-type", "application/jwk-set+json"), ("cache-control", "public, max-age=300"),
            ("access-control-allow-origin", "*")])

    async def discovery(self, req: AsRequest) -> AsResponse:
        return AsResponse(200, self._discovery.body(), [
            ("content-type", "application/json"), ("cache-control", "public, max-age=3600"),
            ("access-control-allow-origin", "*")])


def keyring(ctx: AuthContext) -> Keyring:
    """The installed keyring (e.g. for `rotate()` from the CLI)."""
    keys = ctx.require_keys()
    if not isinstance(keys, Keyring):
        raise RuntimeError("the signing keys are not a Keyring")
    return keys


def gateway_key_source(ctx: AuthContext) -> KeyringJwks:
    """The gateway's JWT key source for this issuer: the keyring, in-process."""
    return KeyringJwks(issuer_config(ctx.cfg), keyring(ctx))


def install(ctx: AuthContext) -> None:
    """Register this area's routes, grants and hooks on `ctx`."""
    cfg, server = ctx.cfg, ctx.server
    ring = Keyring(cfg, ctx.db, ctx.secrets_dir, clock=ctx.clock)
    ring.refresh(force=True)  # the first key now, not on the first request
    ctx.keys = ring
    server.register_token_generator("default", AccessTokenIssuer(cfg, ring, ctx.clock))
    ClientAuthenticator(server, ctx.db, cfg.issuer, ctx.clock).install()
    server.register_grant(ClientCredentials)
    server.signals.setdefault("after_authenticate_client", []).append(_require_dpop)
    own = OwnAccessTokens(cfg, ring, ctx.clock)
    snapshot = RevocationSnapshot(ctx.revocations, ctx.clock)
    server.register_endpoint(Introspection(cfg, own, snapshot, ctx.token_introspectors))
    server.register_endpoint(Revocation(own, ctx.revocations, snapshot, ctx.token_revokers, ctx.clock))
    endpoints = TokenEndpoints(ctx, ring, TokenEndpointDpop(cfg, ctx.secrets_dir, ctx.clock, ctx.replay),
                               Discovery(cfg, ctx.metadata))
    ctx.routes.add("POST", "/oauth2/token", endpoints.token)
    ctx.routes.add("POST", "/oauth2/introspect", endpoints.introspect)
    ctx.routes.add("POST", "/oauth2/revoke", endpoints.revoke)
    ctx.routes.add("GET", "/oauth2/jwks", endpoints.jwks)
    ctx.routes.add("GET", "/.well-known/openid-configuration", endpoints.discovery)
    ctx.routes.add("GET", "/.well-known/oauth-authorization-server", endpoints.discovery)

    task: list[asyncio.Task[None]] = []

    async def maintain() -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_SECONDS)
            try:
                await asyncio.to_thread(ring.maintain)
            except Exception as exc:  # the loop must survive a store outage
                log.warning("signing key maintenance failed: %s", type(exc).__name__)

    async def start() -> None:
        await asyncio.to_thread(ring.maintain)
        task.append(asyncio.get_running_loop().create_task(maintain()))

    async def stop() -> None:
        for t in task:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    ctx.startup.append(start)
    ctx.shutdown.append(stop)

