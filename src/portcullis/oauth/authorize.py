"""The browser side of the authorization server: the authorization endpoint with the
code grant (RFC 6749 §4.1 as OAuth 2.1 narrows it), PKCE (rfc7636.py), PAR
(rfc9126.py), `iss` in responses (rfc9207.py), OpenID Connect (oidc.py), consent
(consent.py) and refresh rotation (refresh.py).

Authorization endpoint (GET/POST /oauth2/authorize):
- Authlib's `AuthorizationCodeGrant` validates the request: client, exact redirect
  URI (`Client.check_redirect_uri`, loopback port aside, RFC 8252 §7.3), response_type
  ``code`` only (no implicit, no hybrid), scope, PKCE S256. An unknown client or a
  redirect URI that does not match is shown as an error page and never redirected
  to (RFC 6749 §4.1.2.1); every other error goes back to the client with `state` and
  `iss` (RFC 9207 §2).
- OIDC parameters: `nonce` (into the ID token), `prompt` (``none``: answer
  login_required / consent_required instead of showing a page; ``login``: the user
  authenticates again; ``consent``: the consent page again), `max_age` (an older
  `auth_time` needs a new login), `acr_values` (at least that class; the login page is
  asked for it: step-up, RFC 9470 §4). A tenant whose policy requires MFA gets at least
  `ACR_MFA` (phishing-resistant: `ACR_PHISHING_RESISTANT`) whatever the client asks.
- Login and consent are interactions stored server-side (rfc9126.PendingRequests):
  the browser returns with an unguessable `request_uri`, never with parameters it
  could edit.

Codes (RFC 6749 §4.1.2, RFC 9700 §4.2.4): stored as keyed hashes with everything the
token request must match or carry forward; single use, at most
`code_lifetime_seconds`; redemption is one atomic `UPDATE ... WHERE used_at IS NULL`,
so of two concurrent redemptions one wins; presenting a used code again is refused
with invalid_grant and revokes every token issued from it (its family, refresh.py).
A code requested with `dpop_jkt` (RFC 9449 §10) is only redeemed with a DPoP proof by
that key.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlencode

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import (
    AccessDeniedError,
    InvalidGrantError,
    InvalidRequestError,
    OAuth2Error,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant

from portcullis.credentials.acr import ACR_MFA, ACR_ORDER, ACR_PHISHING_RESISTANT, acr_satisfies
from portcullis.oauth import consent, db, oidc, refresh, rfc9126, rfc9207
from portcullis.oauth.http import FORM, AsRequest, AsResponse, redirect
from portcullis.oauth.models import AUTH_METHODS, Client, LoginState
from portcullis.oauth.rfc7636 import RequiredS256
from portcullis.oauth.rfc9068 import InvalidTargetError, validate_resources
from portcullis.oauth.rfc9126 import INTERACTION_PREFIX, MAX_LOGIN_ROUNDS, PAR_PREFIX, Interaction, Params

if TYPE_CHECKING:
    from portcullis.oauth.config import AuthServerConfig
    from portcullis.oauth.server import OAuthRequest
    from portcullis.oauth.service import AuthContext

log = logging.getLogger("portcullis.oauth.authorize")

PROMPTS = frozenset({"none", "login", "consent"})
MAX_NONCE = 512
MAX_STATE = 2048
MAX_CODE_CHARS = 256
_JKT = re.compile(r"^[A-Za-z0-9_-]{43}$")
_POLICY_ACR = {"required": ACR_MFA, "phishing_resistant": ACR_PHISHING_RESISTANT}

codes = sa.Table(
    "oauth_codes", db.metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("redirect_uri", sa.Text, nullable=False),
    sa.Column("redirect_uri_given", sa.Boolean, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("code_challenge", sa.String(128), nullable=True),
    sa.Column("code_challenge_method", sa.String(16), nullable=True),
    sa.Column("nonce", sa.String(MAX_NONCE), nullable=True),
    sa.Column("login", sa.Text, nullable=False),          # JSON LoginState
    sa.Column("resources", sa.Text, nullable=False),      # JSON list (RFC 8707)
    sa.Column("dpop_jkt", sa.String(64), nullable=True),  # RFC 9449 §10
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("used_at", sa.Float, nullable=True),
    sa.Column("authorization_id", sa.String(64), nullable=True),
    sa.Column("reused", sa.Boolean, nullable=False, default=False),
)


@dataclass(slots=True)
class CodeRecord:
    """A stored code as Authlib's grant sees it; `authorization_id` is set on redemption."""

    code_hash: str
    client_id: str
    redirect_uri: str
    redirect_uri_given: bool
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    login: LoginState
    resources: tuple[str, ...]
    dpop_jkt: str | None
    expires_at: float
    used_at: float | None
    authorization_id: str | None = None

    def get_redirect_uri(self) -> str | None:
        # RFC 6749 §4.1.3: the token request repeats redirect_uri if the authorization request had it.
        return self.redirect_uri if self.redirect_uri_given else None

    def get_scope(self) -> str:
        return self.scope


@dataclass(frozen=True, slots=True)
class Extras:
    """The authorization request's parameters beyond RFC 6749's, validated."""

    nonce: str | None = None
    prompt: frozenset[str] = frozenset()
    max_age: int | None = None
    acr: str | None = None          # the weakest class the client accepts (acr_values)
    resources: tuple[str, ...] = ()
    dpop_jkt: str | None = None
    state: str | None = None


def _one(datalist: Any, name: str) -> str | None:
    values = datalist.get(name) or []
    if len(values) > 1:
        raise InvalidRequestError(f"Multiple '{name}' in request.")
    return values[0] if values else None


def parse_extras(datalist: Any, cfg: AuthServerConfig) -> Extras:
    """Validate `nonce`, `prompt`, `max_age`, `acr_values`, `resource`, `dpop_jkt` and
    refuse what we do not support; raises OAuth2Error (the caller adds redirect_uri)."""
    if _one(datalist, "request") is not None:
        raise OAuth2Error("Request objects are not supported; use PAR.", error="request_not_supported")
    mode = _one(datalist, "response_mode")
    if mode not in (None, "query"):
        raise InvalidRequestError("Only response_mode=query is supported.")
    state = _one(datalist, "state")
    if state is not None and len(state) > MAX_STATE:
        raise InvalidRequestError("'state' is too long.")
    nonce = _one(datalist, "nonce")
    if nonce is not None and (not nonce or len(nonce) > MAX_NONCE):
        raise InvalidRequestError(f"'nonce' must be 1-{MAX_NONCE} characters.")
    prompt = frozenset((_one(datalist, "prompt") or "").split())
    if not prompt <= PROMPTS:
        raise InvalidRequestError(f"Unsupported 'prompt' value; supported: {', '.join(sorted(PROMPTS))}.")
    if "none" in prompt and len(prompt) > 1:
        # OIDC Core §3.1.2.1: none with any other value is an error.
        raise InvalidRequestError("prompt=none cannot be combined with other values.")
    raw_age = _one(datalist, "max_age")
    max_age = None
    if raw_age is not None:
        if not raw_age.isdigit() or len(raw_age) > 9:
            raise InvalidRequestError("'max_age' must be a non-negative integer.")
        max_age = int(raw_age)
    acr = None
    raw_acr = _one(datalist, "acr_values")
    if raw_acr is not None:
        known = [a for a in raw_acr.split() if a in ACR_ORDER]
        if not known:
            raise InvalidRequestError(f"Unsupported 'acr_values'; supported: {' '.join(ACR_ORDER)}.")
        # acr_values lists acceptable classes: any of them will do, so require the weakest.
        acr = min(known, key=ACR_ORDER.index)
    # RFC 8707 §2: absolute URIs without a fragment, each one this server serves.
    resources = tuple(validate_resources(cfg, list(datalist.get("resource") or [])))
    jkt = _one(datalist, "dpop_jkt")
    if jkt is not None and not _JKT.match(jkt):
        raise InvalidRequestError("'dpop_jkt' must be a base64url SHA-256 JWK thumbprint (RFC 9449 section 10).")
    return Extras(nonce, prompt, max_age, acr, resources, jkt, state)


def stronger(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if ACR_ORDER.index(a) >= ACR_ORDER.index(b) else b


class Codes:
    """The code store."""

    def __init__(self, ctx: AuthContext) -> None:
        self._ctx = ctx

    def hash(self, code: str) -> str:
        return self._ctx.hasher.digest("code:" + code)

    def save(self, code: str, *, client_id: str, redirect_uri: str, redirect_uri_given: bool, scope: str,
             challenge: str | None, method: str | None, extras: Extras, login: LoginState) -> None:
        now = self._ctx.clock()
        with self._ctx.db.begin() as conn:
            # Used and expired codes are kept a day for reuse detection, then dropped.
            conn.execute(codes.delete().where(codes.c.expires_at < now - 86400))
            conn.execute(codes.insert().values(
                code_hash=self.hash(code), client_id=client_id, redirect_uri=redirect_uri,
                redirect_uri_given=redirect_uri_given, scope=scope, code_challenge=challenge,
                code_challenge_method=method, nonce=extras.nonce, login=refresh.login_to_json(login),
                resources=db.dumps(list(extras.resources)), dpop_jkt=extras.dpop_jkt, created_at=now,
                expires_at=now + self._ctx.cfg.code_lifetime_seconds, reused=False))

    def find(self, code: str) -> CodeRecord | None:
        if not code or len(code) > MAX_CODE_CHARS:
            return None
        with self._ctx.db.engine.connect() as conn:
            r = conn.execute(sa.select(codes).where(codes.c.code_hash == self.hash(code))).first()
        if r is None:
            return None
        return CodeRecord(r.code_hash, r.client_id, r.redirect_uri, bool(r.redirect_uri_given), r.scope,
                          r.code_challenge, r.code_challenge_method, r.nonce, refresh.login_from_json(r.login),
                          tuple(db.loads_list(r.resources)), r.dpop_jkt, float(r.expires_at), r.used_at,
                          r.authorization_id)

    def claim(self, code_hash: str) -> bool:
        """Mark the code used; False if it already was or has expired (atomic)."""
        now = self._ctx.clock()
        with self._ctx.db.begin() as conn:
            n = conn.execute(codes.update().where(
                (codes.c.code_hash == code_hash) & codes.c.used_at.is_(None) & (codes.c.expires_at > now)
            ).values(used_at=now)).rowcount
        return n == 1

    def link(self, code_hash: str, family_id: str) -> None:
        with self._ctx.db.begin() as conn:
            conn.execute(codes.update().where(codes.c.code_hash == code_hash).values(authorization_id=family_id))

    def mark_reused(self, code_hash: str) -> str | None:
        """Flag a reuse; returns the family issued from the code, if already known."""
        with self._ctx.db.begin() as conn:
            conn.execute(codes.update().where(codes.c.code_hash == code_hash).values(reused=True))
            r = conn.execute(sa.select(codes.c.authorization_id).where(codes.c.code_hash == code_hash)).first()
        return r.authorization_id if r is not None else None

    def reused(self, code_hash: str) -> bool:
        with self._ctx.db.engine.connect() as conn:
            r = conn.execute(sa.select(codes.c.reused).where(codes.c.code_hash == code_hash)).first()
        return bool(r and r.reused)


@dataclass
class Services:
    """What the grants and handlers share (one per installed server)."""

    ctx: AuthContext
    codes: Codes
    grants: refresh.Grants
    pending: rfc9126.PendingRequests
    consents: consent.Consents
    csrf: consent.Csrf

    def now(self) -> float:
        return self.ctx.clock()


class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    """Authlib's code grant over our stores. `svc` is bound by `bind_code_grant`."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = list(AUTH_METHODS)
    AUTHORIZATION_CODE_LENGTH = 43  # ~256 bits
    svc: Services
    extras: Extras = Extras()

    # --- authorization endpoint ---
    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        try:
            self.extras = parse_extras(self.request.payload.datalist, self.svc.ctx.cfg)
        except OAuth2Error as err:
            err.redirect_uri = redirect_uri
            raise
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuthRequest) -> None:
        data = request.payload.data
        self.svc.codes.save(code, client_id=request.client.client_id, redirect_uri=self.redirect_uri,
                            redirect_uri_given=bool(data.get("redirect_uri")), scope=request.scope or "",
                            challenge=data.get("code_challenge"), method=data.get("code_challenge_method"),
                            extras=self.extras, login=request.user)

    # --- token endpoint ---
    def query_authorization_code(self, code: str, client: Client) -> CodeRecord | None:
        audit = self.request.as_request.audit
        rec = self.svc.codes.find(code) if isinstance(code, str) else None
        if rec is None:
            audit["code"] = "unknown"
            return None
        if rec.client_id != client.client_id:
            audit["code"] = "other_client"
            return None
        if rec.used_at is not None:
            self._reused(rec)
            return None
        if self.svc.now() >= rec.expires_at:
            audit["code"] = "expired"
            return None
        return rec

    def _reused(self, rec: CodeRecord) -> None:
        """RFC 6749 §4.1.2: "If an authorization code is used more than once, the
        authorization server MUST deny the request and SHOULD revoke (when possible) all
        tokens previously issued based on that authorization code." """
        self.request.as_request.audit.update(code="reused", code_reuse=True)
        family = self.svc.codes.mark_reused(rec.code_hash)
        if family is not None:
            self.svc.grants.revoke(family, "oauth.code_reuse")

    def authenticate_user(self, authorization_code: CodeRecord) -> LoginState:
        return authorization_code.login

    def delete_authorization_code(self, authorization_code: CodeRecord) -> None:
        """Codes are spent (kept for reuse detection), not deleted."""

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        svc = self.svc
        rec: CodeRecord = self.request.authorization_code
        client: Client = self.request.client
        if rec.dpop_jkt is not None and self.request.dpop_jkt != rec.dpop_jkt:
            # RFC 9449 §10: the token request's proof key must be the one named by dpop_jkt.
            raise InvalidGrantError("The DPoP proof's key does not match the authorization request's dpop_jkt.")
        asked = list(self.request.resources)
        if asked and rec.resources and not set(asked) <= set(rec.resources):
            raise InvalidTargetError(description="The resource was not part of the authorization request.")
        if not asked:
            self.request.resources = list(rec.resources)
        if not svc.codes.claim(rec.code_hash):
            # A concurrent redemption won: this one is the reuse.
            self._reused(rec)
            raise InvalidGrantError("Invalid 'code' in request.")
        family = svc.grants.start(client_id=client.client_id, login=rec.login, scope=rec.scope,
                                  resources=list(self.request.resources), dpop_jkt=self.request.dpop_jkt)
        svc.codes.link(rec.code_hash, family)
        rec.authorization_id = family
        self.request.as_request.audit["family"] = family
        login = rec.login
        self.request.user = login
        token: dict[str, Any] = self.generate_token(
            user=login, scope=rec.scope,
            include_refresh_token=refresh.wants_refresh_token(client.grant_types, rec.scope))
        if "openid" in rec.scope.split():
            token["id_token"] = oidc.issue_id_token(svc.ctx, client_id=client.client_id, login=login,
                                                    nonce=rec.nonce, access_token=token.get("access_token"))
        self.save_token(token)
        if svc.codes.reused(rec.code_hash):  # a reuse raced this redemption
            svc.grants.revoke(family, "oauth.code_reuse")
        return 200, token, self.TOKEN_RESPONSE_HEADER


def bind_code_grant(svc: Services) -> type[CodeGrant]:
    return type("BoundCodeGrant", (CodeGrant,), {"svc": svc})


def _state(params: Params) -> str | None:
    values = params.get("state") or []
    return values[0] if len(values) == 1 else None


class AuthorizeEndpoint:
    """GET/POST /oauth2/authorize and POST /oauth2/consent."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.ctx = svc.ctx

    # --- request plumbing ---
    def _synthetic(self, req: AsRequest, params: Params) -> AsRequest:
        """The authorization request as Authlib should see it: exactly `params`."""
        return AsRequest(method="GET", path="/oauth2/authorize", query=params, headers=req.headers, body=b"",
                         client_ip=req.client_ip, scheme=req.scheme, host=req.host, issuer=req.issuer,
                         request_id=req.request_id, client_cert_der=req.client_cert_der, cookies=req.cookies,
                         audit=req.audit)

    def grant_for(self, req: AsRequest, params: Params) -> CodeGrant:
        """Validate an authorization request (raises OAuth2Error)."""
        grant: CodeGrant = self.ctx.server.get_consent_grant(self._synthetic(req, params), end_user=None)
        return grant

    def validate_pushed(self, req: AsRequest, client: Client, params: Params) -> None:
        """rfc9126.Validator: the same rules as here, errors never redirected."""
        try:
            self.grant_for(req, params)
        except OAuth2Error as err:
            err.redirect_uri = None
            raise

    def _error(self, req: AsRequest, err: OAuth2Error, params: Params, interaction: str | None) -> AsResponse:
        req.audit["error"] = err.error
        if interaction is not None:
            self.svc.pending.finish(interaction)
        if not err.redirect_uri:
            # RFC 6749 §4.1.2.1: no redirect to an unverified client or redirect URI.
            return consent.error_page("This sign-in request cannot be completed",
                                      f"{err.error}: {err.description or 'the request is invalid.'} "
                                      "Return to the application and try again.",
                                      reason=f"oauth.authorize_{err.error}")
        out = [("error", str(err.error))]
        if err.description:
            out.append(("error_description", str(err.description)))
        loc = rfc9207.authorization_response(err.redirect_uri, self.ctx.cfg.issuer, out, _state(params))
        return redirect(loc, status=302 if req.method == "GET" else 303, reason=f"oauth.authorize_{err.error}")

    async def authorize(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._authorize, req)

    async def consent(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._consent, req)

    def _authorize(self, req: AsRequest) -> AsResponse:
        if req.method == "POST":
            if req.content_type != FORM:
                return consent.error_page("Bad request", "The form must be url-encoded.", reason="oauth.malformed")
            params = {k: list(v) for k, v in req.form.items()}
        else:
            params = {k: list(v) for k, v in req.query.items()}
        client_ids = params.get("client_id") or []
        if len(client_ids) != 1:
            return self._error(req, InvalidRequestError("Exactly one 'client_id' is required."), params, None)
        client_id = client_ids[0]
        req.audit["client_id"] = client_id[:64]
        uris = params.get("request_uri")
        if uris is None:
            return self._proceed(req, params, interaction=None, from_par=False)
        if len(uris) != 1:
            return self._error(req, InvalidRequestError("Multiple 'request_uri' in request."), params, None)
        uri = uris[0]
        client = self.ctx.clients.get(client_id)
        if client is None:
            return self._error(req, OAuth2Error("Unknown client.", error="invalid_client"), params, None)
        if uri.startswith(PAR_PREFIX):
            # RFC 9126 §4: the pushed parameters are the request; other parameters are ignored.
            pushed = self.svc.pending.take_par(uri, client.client_id)
            if pushed is None:
                return self._error(req, OAuth2Error("The request_uri is unknown, expired or already used.",
                                                    error="invalid_request_uri"), params, None)
            req.audit["par"] = True
            return self._proceed(req, pushed, interaction=None, from_par=True)
        if uri.startswith(INTERACTION_PREFIX):
            inter = self.svc.pending.interaction(uri, client.client_id)
            if inter is None:
                return self._error(req, OAuth2Error("This sign-in has expired or was completed.",
                                                    error="invalid_request_uri"), params, None)
            return self._proceed(req, inter.params, interaction=inter, from_par=inter.from_par)
        return self._error(req, OAuth2Error("Unsupported request_uri.", error="invalid_request_uri"), params, None)

    def _consent(self, req: AsRequest) -> AsResponse:
        sessions = self.ctx.require_sessions()
        login = sessions.current(req)
        if req.content_type != FORM:
            return consent.error_page("Bad request", "The form must be url-encoded.", reason="oauth.malformed")
        if login is None:
            return consent.error_page("Your session has ended", "Return to the application and sign in again.",
                                      status=401, reason="oauth.consent_no_session")
        req.audit["user_id"] = login.user_id
        if not self.svc.csrf.check(req, login):
            return consent.error_page("Request refused", "The form has expired. Return to the application and "
                                      "try again.", status=403, reason="oauth.consent_csrf")
        client_id, uri, decision = req.param("client_id") or "", req.param("request_uri") or "", req.param("decision")
        req.audit["client_id"] = client_id[:64]
        inter = self.svc.pending.interaction(uri, client_id) if uri.startswith(INTERACTION_PREFIX) else None
        if inter is None or decision not in ("allow", "deny"):
            return consent.error_page("This sign-in has expired", "Return to the application and try again.",
                                      reason="oauth.consent_expired")
        return self._proceed(req, inter.params, interaction=inter, from_par=inter.from_par, decision=decision)

    # --- the decision ---
    def _proceed(self, req: AsRequest, params: Params, *, interaction: Interaction | None, from_par: bool,
                 decision: str | None = None) -> AsResponse:
        inter_uri = interaction.uri if interaction is not None else None
        try:
            grant = self.grant_for(req, params)
        except OAuth2Error as err:
            return self._error(req, err, params, inter_uri)
        client: Client = grant.request.client
        ex = grant.extras
        cfg = self.ctx.cfg

        def fail(err: OAuth2Error) -> AsResponse:
            err.redirect_uri = grant.redirect_uri
            return self._error(req, err, params, inter_uri)

        if (cfg.require_par or client.require_par) and not from_par:
            # RFC 9126 §5: a client (or server) that requires PAR refuses other requests.
            return fail(InvalidRequestError("This client must use pushed authorization requests (PAR)."))
        now = self.svc.now()
        if interaction is not None:
            min_auth_time = interaction.min_auth_time
        else:
            floors = ([now] if "login" in ex.prompt else []) + ([now - ex.max_age] if ex.max_age is not None else [])
            min_auth_time = max(floors) if floors else None
        sessions = self.ctx.require_sessions()
        login = sessions.current(req)
        required = ex.acr
        if login is not None:
            required = stronger(required, _POLICY_ACR.get(self.ctx.clients.tenant_policy(login.tenant) or ""))
        stale = login is not None and min_auth_time is not None and login.auth_time < min_auth_time
        weak = login is not None and required is not None and not acr_satisfies(login.acr, required)
        if login is None or stale or weak:
            req.audit["login"] = "missing" if login is None else ("stale" if stale else "acr_too_weak")
            if "none" in ex.prompt:
                return fail(OAuth2Error("The user must sign in.", error="login_required"))
            if decision is not None:  # the session changed under the consent page
                return fail(AccessDeniedError("The sign-in is no longer valid."))
            if interaction is None:
                inter_uri = self.svc.pending.open_interaction(client.client_id, params, from_par=from_par,
                                                              min_auth_time=min_auth_time)
            elif interaction.login_rounds >= MAX_LOGIN_ROUNDS:
                return fail(AccessDeniedError("The required authentication was not completed."))
            assert inter_uri is not None
            self.svc.pending.login_round(inter_uri)
            return_to = "/oauth2/authorize?" + urlencode({"client_id": client.client_id, "request_uri": inter_uri})
            # force: authenticate again (prompt=login, max_age); a weak acr only steps up.
            return redirect(sessions.login_url(return_to, force=stale, acr=required),
                            status=302 if req.method == "GET" else 303, reason="oauth.login_needed")
        req.audit.update(user_id=login.user_id, tenant=login.tenant)
        scopes = (grant.request.scope or "").split()
        if decision == "deny":
            return fail(AccessDeniedError("The user denied access."))
        if decision == "allow":
            self.svc.consents.grant(login.user_id, client.client_id, scopes)
            req.audit["consent"] = "granted"
        elif consent.consent_required(client, login) and (
                "consent" in ex.prompt or not self.svc.consents.covers(login.user_id, client.client_id, scopes)):
            if "none" in ex.prompt:
                return fail(OAuth2Error("The user must consent.", error="consent_required"))
            if inter_uri is None:
                inter_uri = self.svc.pending.open_interaction(client.client_id, params, from_par=from_par,
                                                              min_auth_time=min_auth_time)
            return consent.consent_page(client=client, login=login, scopes=scopes, request_uri=inter_uri,
                                        csrf=self.svc.csrf.token(req, login))
        if inter_uri is not None and not self.svc.pending.finish(inter_uri):
            return consent.error_page("This sign-in was already completed", "Return to the application.",
                                      reason="oauth.interaction_done")
        code = grant.generate_authorization_code()
        grant.request.user = login
        grant.save_authorization_code(code, grant.request)
        loc = rfc9207.authorization_response(grant.redirect_uri, cfg.issuer, [("code", code)], ex.state)
        return redirect(loc, status=302 if req.method == "GET" else 303, reason="oauth.code_issued")


def _late_clock(ctx: AuthContext) -> Callable[[], float]:
    """`ctx.clock`, read at call time (tests swap it)."""
    def clock() -> float:
        return ctx.clock()
    return clock


def grants_for(ctx: AuthContext) -> refresh.Grants:
    """The authorization/refresh store over `ctx` (CLI, admin: same tables the server uses)."""
    return refresh.Grants(ctx.db, ctx.hasher, ctx.revocations, ctx.cfg, _late_clock(ctx))


def revoke_user_grants(ctx: AuthContext, user_id: str, client_id: str | None = None) -> int:
    """Revoke what a user granted (one client, or all): remembered consent, refresh
    families and their access tokens. Returns the number of families revoked."""
    consent.Consents(ctx.db, _late_clock(ctx)).forget(user_id, client_id)
    return grants_for(ctx).revoke_user(user_id, client_id, "oauth.user_revoked")


def _merge_list(md: dict[str, Any], key: str, values: list[str]) -> None:
    current = list(md.get(key) or [])
    md[key] = current + [v for v in values if v not in current]


def install(ctx: AuthContext) -> None:
    """Register the code and refresh grants, the token saver, the authorization, PAR,
    consent, userinfo and granted-apps endpoints, revokers, introspectors and metadata."""
    clock = _late_clock(ctx)
    grants = refresh.Grants(ctx.db, ctx.hasher, ctx.revocations, ctx.cfg, clock)
    svc = Services(ctx=ctx, codes=Codes(ctx), grants=grants,
                   pending=rfc9126.PendingRequests(ctx.db, ctx.hasher, clock),
                   consents=consent.Consents(ctx.db, clock), csrf=consent.Csrf(ctx))
    server = ctx.server
    server.register_grant(bind_code_grant(svc), [RequiredS256()])

    def id_token_on_refresh(token: dict[str, Any], rec: refresh.RefreshRecord, request: OAuthRequest) -> None:
        scope = str(request.payload.scope or rec.scope)
        if "openid" in scope.split():
            # OIDC Core §12.2: same sub/auth_time as the original; no nonce.
            token["id_token"] = oidc.issue_id_token(ctx, client_id=rec.client_id, login=rec.login, nonce=None,
                                                    access_token=token.get("access_token"))

    server.register_grant(refresh.bind_refresh_grant(grants, ctx.cfg, clock, id_token_on_refresh))

    def save(token: dict[str, Any], request: OAuthRequest) -> None:
        rt, ac = request.refresh_token, request.authorization_code
        if isinstance(rt, refresh.RefreshRecord):
            # RFC 6749 §6: the new refresh token has the scope of the one it replaces.
            grants.record(rt.authorization_id, access_token=token.get("access_token"),
                          refresh_token=token.get("refresh_token"), scope=rt.scope)
        elif isinstance(ac, CodeRecord) and ac.authorization_id is not None:
            grants.record(ac.authorization_id, access_token=token.get("access_token"),
                          refresh_token=token.get("refresh_token"), scope=ac.scope)

    server.token_savers.append(save)
    ctx.token_revokers.append(grants.revoker)
    ctx.token_introspectors.append(grants.introspector)

    endpoint = AuthorizeEndpoint(svc)
    ctx.routes.add("GET", "/oauth2/authorize", endpoint.authorize)
    ctx.routes.add("POST", "/oauth2/authorize", endpoint.authorize)
    ctx.routes.add("POST", "/oauth2/consent", endpoint.consent)
    ctx.routes.add("POST", "/oauth2/par", rfc9126.ParEndpoint(ctx, svc.pending, endpoint.validate_pushed))
    userinfo = oidc.UserInfo(ctx, grants)
    ctx.routes.add("GET", "/oauth2/userinfo", userinfo)
    ctx.routes.add("POST", "/oauth2/userinfo", userinfo)
    apps = consent.AppsPage(ctx, svc.consents, svc.csrf,
                            lambda user_id: [g.client_id for g in grants.user_grants(user_id)],
                            lambda user_id, client_id: grants.revoke_user(user_id, client_id, "oauth.user_revoked"))
    ctx.routes.add("GET", "/account/apps", apps.get)
    ctx.routes.add("POST", "/account/apps", apps.post)

    md = ctx.metadata
    iss = ctx.cfg.issuer
    md["authorization_endpoint"] = f"{iss}/oauth2/authorize"
    _merge_list(md, "response_types_supported", ["code"])
    md["response_modes_supported"] = ["query"]
    md["code_challenge_methods_supported"] = ["S256"]
    _merge_list(md, "grant_types_supported", ["authorization_code", "refresh_token"])
    _merge_list(md, "scopes_supported", ["openid", "profile", "email", "offline_access"])
    md["prompt_values_supported"] = sorted(PROMPTS)
    md["acr_values_supported"] = list(ACR_ORDER)
    md.update(rfc9207.METADATA)
    md.update(rfc9126.metadata(ctx))
    md.update(oidc.metadata(ctx, ctx.cfg.signing_alg))
