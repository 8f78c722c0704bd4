"""OpenID Connect Core 1.0: ID tokens and the UserInfo endpoint.

ID tokens (§2, §3.1.3.6) are signed by the issuer's current key with `typ` ``JWT``
and carry iss, sub, aud (the client), azp, exp, iat, auth_time, nonce (when the
request had one, §3.1.2.1), acr, amr and at_hash (§3.1.3.6: the left half of the hash
of the access token, Authlib's `create_half_hash`). On refresh (§12.2) the ID token
keeps the original auth_time and carries no nonce.

UserInfo (§5.3) takes a bearer (or DPoP-bound, RFC 9449 §7) access token of this
issuer with the ``openid`` scope and answers `sub`, the tenant claim, and
`preferred_username` / `email` per the ``profile`` / ``email`` scopes (§5.4).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from authlib.oidc.core.util import create_half_hash
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from portcullis.credentials.rfc9449 import DpopConfig, DpopRefusal, DpopVerifier
from portcullis.oauth.http import AsRequest, AsResponse, json_response
from portcullis.oauth.models import LoginState

if TYPE_CHECKING:
    from portcullis.oauth.refresh import Grants
    from portcullis.oauth.service import AuthContext

#: Bound on a presented access token (DESIGN.md: every parser is bounded).
MAX_TOKEN_BYTES = 8192
CLAIMS_SUPPORTED = ["iss", "sub", "aud", "azp", "exp", "iat", "auth_time", "nonce", "acr", "amr", "at_hash",
                    "preferred_username", "email"]


def id_token_claims(*, issuer: str, client_id: str, login: LoginState, now: float, lifetime: int,
                    nonce: str | None, access_token: str | None, alg: str, tenant_claim: str) -> dict[str, Any]:
    """The claims of an ID token (OIDC Core §2)."""
    claims: dict[str, Any] = {
        "iss": issuer, "sub": login.user_id, "aud": client_id, "azp": client_id,
        "iat": int(now), "exp": int(now) + lifetime, "auth_time": int(login.auth_time),
        "acr": login.acr, "amr": list(login.amr), tenant_claim: login.tenant,
    }
    if nonce:
        claims["nonce"] = nonce
    if access_token:
        half = create_half_hash(access_token, alg)
        if half is not None:
            claims["at_hash"] = half.decode("ascii") if isinstance(half, bytes) else str(half)
    return claims


def issue_id_token(ctx: AuthContext, *, client_id: str, login: LoginState, nonce: str | None,
                   access_token: str | None) -> str:
    keys = ctx.require_keys()
    claims = id_token_claims(issuer=ctx.cfg.issuer, client_id=client_id, login=login, now=ctx.clock(),
                             lifetime=ctx.cfg.id_token_lifetime_seconds, nonce=nonce, access_token=access_token,
                             alg=keys.alg, tenant_claim=ctx.cfg.tenant_claim)
    return keys.sign(claims, "JWT")


def _challenge(scheme: str, error: str | None = None, description: str | None = None) -> tuple[str, str]:
    parts = ['realm="portcullis"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scheme == "DPoP":
        parts.append('algs="ES256 EdDSA"')
    return ("www-authenticate", f"{scheme} " + ", ".join(parts))


class UserInfo:
    """GET/POST /oauth2/userinfo."""

    def __init__(self, ctx: AuthContext, grants: Grants) -> None:
        self._ctx = ctx
        self._grants = grants
        self._dpop = DpopVerifier(DpopConfig(), clock=ctx.clock)

    def _refuse(self, req: AsRequest, scheme: str, status: int, error: str | None, description: str | None,
                *, reason: str) -> AsResponse:
        req.audit["reason"] = reason
        doc = {"error": error or "invalid_request", "error_description": description or "An access token is required."}
        return json_response(doc, status, [_challenge(scheme, error, description)], reason=reason)

    async def __call__(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._handle, req)

    def _handle(self, req: AsRequest) -> AsResponse:
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        scheme = scheme.lower()
        if scheme not in ("bearer", "dpop") or not token.strip():
            return self._refuse(req, "Bearer", 401, None, None, reason="oauth.userinfo_no_token")
        token = token.strip()
        shown = "DPoP" if scheme == "dpop" else "Bearer"
        if len(token) > MAX_TOKEN_BYTES:
            return self._refuse(req, shown, 401, "invalid_token", "The access token is not valid.",
                                reason="oauth.token_too_large")
        claims = self._verify(token)
        if claims is None:
            return self._refuse(req, shown, 401, "invalid_token", "The access token is not valid.",
                                reason="oauth.token_invalid")
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if jkt is not None or scheme == "dpop":
            # RFC 9449 §7.1: a DPoP-bound token needs the DPoP scheme and a proof by its key.
            if scheme != "dpop" or not isinstance(jkt, str):
                return self._refuse(req, "DPoP", 401, "invalid_token", "The access token is DPoP-bound.",
                                    reason="oauth.dpop_binding")
            proof = req.headers.get("dpop")
            try:
                self._dpop.verify(proof.encode() if proof else None, method=req.method,
                                  url=f"{req.issuer}{req.path}", access_token=token.encode(), expected_jkt=jkt)
            except DpopRefusal as exc:
                return self._refuse(req, "DPoP", 401, exc.error, exc.detail, reason=exc.reason)
        scopes = str(claims.get("scope", "")).split()
        if "openid" not in scopes:
            return self._refuse(req, shown, 403, "insufficient_scope", "The openid scope is required.",
                                reason="oauth.userinfo_scope")
        jti = claims.get("jti")
        found = self._grants.login_for_jti(jti) if isinstance(jti, str) else None
        if found is None or self._revoked(claims):
            return self._refuse(req, shown, 401, "invalid_token", "The access token is not valid.",
                                reason="oauth.token_revoked")
        login, client_id = found
        req.audit.update(client_id=client_id, sub=login.user_id)
        doc: dict[str, Any] = {"sub": login.user_id, self._ctx.cfg.tenant_claim: login.tenant}
        if "profile" in scopes:
            doc["preferred_username"] = login.username
        if "email" in scopes and "@" in login.username:
            # Users log in with their e-mail address where they have one (identity pages).
            doc["email"] = login.username
        return json_response(doc, reason="oauth.userinfo")

    def _verify(self, token: str) -> dict[str, Any] | None:
        keys = self._ctx.require_keys()
        try:
            keyset = KeySet.import_key_set(keys.jwks())  # type: ignore[arg-type]
            decoded = jwt.decode(token, keyset, algorithms=[keys.alg])
        except (JoseError, ValueError, TypeError):
            return None
        typ = str(decoded.header.get("typ", "")).lower().removeprefix("application/")
        claims = dict(decoded.claims)
        now = self._ctx.clock()
        exp = claims.get("exp")
        if typ != "at+jwt" or claims.get("iss") != self._ctx.cfg.issuer:
            return None
        if not isinstance(exp, int | float) or now >= float(exp) + 30:
            return None
        return claims

    def _revoked(self, claims: dict[str, Any]) -> bool:
        now = self._ctx.clock()
        values = {("jti", claims.get("jti")), ("sub", claims.get("sub")), ("client", claims.get("client_id"))}
        return any((r.kind, r.value) in values for r in self._ctx.revocations.revocations(now))


def metadata(ctx: AuthContext, alg: str) -> dict[str, Any]:
    """OIDC Discovery §3 fields this module serves."""
    return {
        "userinfo_endpoint": f"{ctx.cfg.issuer}/oauth2/userinfo",
        "id_token_signing_alg_values_supported": [alg],
        "userinfo_signing_alg_values_supported": [],
        "subject_types_supported": ["public"],
        "claims_supported": [*CLAIMS_SUPPORTED, ctx.cfg.tenant_claim],
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
    }

