"""Token introspection (RFC 7662) on Authlib's `IntrospectionEndpoint`.

Who may ask (§2.1 "the endpoint MUST also require some form of authorization"): any
confidential client, authenticated by its registered method; a failed authentication is
a 401 ``invalid_client`` (§2.3), which says nothing about the token. An authenticated
client learns about tokens of its own tenant only; for any other token — unknown,
expired, revoked, or another tenant's — it gets ``{"active": false}`` and nothing else
(§2.2 "the authorization server MUST return an introspection response with the active
field set to false"; §4 "to avoid disclosing the internal state of the authorization
server").

Our JWT access tokens are verified here (signature with a published key, `typ`, `iss`,
`exp`, and revocation by `jti`, `sub` or client); verified tokens are cached by their
SHA-256 until `exp`, and the revocation list is a snapshot re-read when the store's
revision moves (checked at most every `REVOCATION_POLL` seconds). Other tokens (refresh
tokens) go to `ctx.token_introspectors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from portcullis.credentials.jwt import IssuerKeys, alg_fits_key, b64decode, verify_signature
from portcullis.oauth.client_auth import CONFIDENTIAL_METHODS
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.keys import Keyring
from portcullis.oauth.models import Client
from portcullis.oauth.server import OAuthRequest
from portcullis.oauth.service import TokenIntrospector
from portcullis.storage.protocols import RevocationStore

MAX_TOKEN_BYTES = 8192
REVOCATION_POLL = 0.2
CACHE_SIZE = 100_000


class RevocationSnapshot:
    """The revocation store in memory: kind -> value -> until (inf: for ever)."""

    def __init__(self, store: RevocationStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._rev = -1
        self._checked = -1e18
        self._entries: dict[str, dict[str, float]] = {"jti": {}, "sub": {}, "client": {}}

    def invalidate(self) -> None:
        self._checked = -1e18

    def _fresh(self) -> None:
        mono = time.monotonic()
        if mono - self._checked < REVOCATION_POLL:
            return
        self._checked = mono
        rev = self._store.revision()
        if rev == self._rev:
            return
        entries = self._store.revocations(self._clock())
        self._entries = {kind: {e.value: e.expires_at if e.expires_at is not None else math.inf
                                for e in entries if e.kind == kind} for kind in ("jti", "sub", "client")}
        self._rev = rev

    def revoked(self, claims: dict[str, Any]) -> bool:
        self._fresh()
        now = self._clock()
        e = self._entries
        return (e["jti"].get(str(claims.get("jti")), 0.0) > now or e["sub"].get(str(claims.get("sub")), 0.0) > now
                or e["client"].get(str(claims.get("client_id")), 0.0) > now)


@dataclass(slots=True)
class _Cached:
    claims: dict[str, Any]
    exp: float


class OwnAccessTokens:
    """Verifies this server's JWT access tokens (signature, typ, iss, exp).

    `claims(token)` returns the verified claims of an unexpired token, or None
    (not ours, forged, malformed or expired). Revocation is the caller's check.
    """

    def __init__(self, cfg: AuthServerConfig, keyring: Keyring, clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self._keyring = keyring
        self._clock = clock
        self._keys: IssuerKeys | None = None
        self._version = -1
        self._cache: dict[bytes, _Cached] = {}

    def _issuer_keys(self) -> IssuerKeys:
        self._keyring.refresh()
        if self._keys is None or self._version != self._keyring.version:
            self._keys = self._keyring.verification_keys()
            self._version = self._keyring.version
        return self._keys

    def claims(self, token: str) -> dict[str, Any] | None:
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            return None
        raw = token.encode("ascii", "replace")
        digest = hashlib.sha256(raw).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit.exp:
                return hit.claims
            del self._cache[digest]
        h, p, s = raw.split(b".")
        try:
            header = json.loads(b64decode(h))
            claims = json.loads(b64decode(p))
            sig = b64decode(s)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return None
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg != self._keyring.alg or typ != "at+jwt" or not isinstance(kid, str) or "crit" in header:
            return None
        keys = self._issuer_keys()
        if not keys.has(kid):
            self._keyring.refresh(force=True)  # another process may just have rotated
            keys = self._issuer_keys()
        if not any(verify_signature(alg, k, h + b"." + p, sig) for k, declared in keys.candidates(kid)
                   if alg_fits_key(alg, declared)):
            return None
        exp = claims.get("exp")
        if claims.get("iss") != self._cfg.issuer or not isinstance(exp, int) or now >= exp:
            return None
        self._cache[digest] = _Cached(claims, float(exp))
        if len(self._cache) > CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        return claims


@dataclass(frozen=True, slots=True)
class Found:
    """A token the endpoint recognised (Authlib's token contract)."""

    doc: dict[str, Any]
    tenant: str | None
    client_id: str | None

    def is_expired(self) -> bool:
        return False  # only unexpired tokens are ever found

    def is_revoked(self) -> bool:
        return False  # only unrevoked tokens are ever found


class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    """RFC 7662 §2 over our token verifier and the other areas' introspectors."""

    CLIENT_AUTH_METHODS = CONFIDENTIAL_METHODS

    def __init__(self, cfg: AuthServerConfig, tokens: OwnAccessTokens, revocations: RevocationSnapshot,
                 introspectors: list[TokenIntrospector]) -> None:
        super().__init__()
        self._cfg = cfg
        self._tokens = tokens
        self._revocations = revocations
        self._introspectors = introspectors

    def check_params(self, request: OAuthRequest, client: Client) -> None:
        # §2.1: token is REQUIRED; token_type_hint is only a hint (we search everywhere).
        token = request.as_request.form.get("token")
        if not token or len(token) != 1:
            raise InvalidRequestError(description="Exactly one token parameter is required.")

    def query_token(self, token_string: str, token_type_hint: str | None) -> Found | None:
        claims = self._tokens.claims(token_string)
        if claims is not None:
            if self._revocations.revoked(claims):
                return None
            doc = {"active": True, **claims,
                   "token_type": "DPoP" if isinstance(claims.get("cnf"), dict) and "jkt" in claims["cnf"]
                   else "Bearer"}
            tenant = claims.get(self._cfg.tenant_claim)
            return Found(doc, tenant if isinstance(tenant, str) else None, claims.get("client_id"))
        for introspect in self._introspectors:
            other = introspect(token_string)
            if other is not None and other.get("active"):
                tenant = other.get(self._cfg.tenant_claim)
                cid = other.get("client_id")
                return Found(other, tenant if isinstance(tenant, str) else None, cid if isinstance(cid, str) else None)
        return None

    def check_permission(self, token: Found, client: Client, request: OAuthRequest) -> bool:
        # A client may introspect tokens of its own tenant (its own tokens included).
        ok = token.tenant == client.tenant if token.tenant is not None else token.client_id == client.client_id
        request.as_request.audit["introspected"] = "active" if ok else "other_tenant"
        return ok

    def introspect_token(self, token: Found) -> dict[str, Any]:
        return dict(token.doc)
