"""authenticate: credentials -> a `Principal` (DESIGN.md, request path step 4).

This stage knows API keys, presented as ``Authorization: Bearer <key>`` (RFC 6750
§2.1) or as ``X-API-Key: <key>``, and JWT access tokens from trusted issuers
(`portcullis.credentials.jwt`) as ``Authorization: Bearer <jwt>`` on routes whose
``auth`` lists ``jwt``. A Bearer value starting with the API key prefix is always
treated as an API key. Every failure is a 401 with a
``WWW-Authenticate: Bearer`` challenge (RFC 6750 §3) and a precise audit reason; the
client sees only that the credential is invalid, not why (no oracle for attackers),
except for the expiry, which RFC 6750 §3.1 lets us state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar
from urllib.parse import unquote

from portcullis.credentials import apikeys
from portcullis.credentials.introspection import Introspector
from portcullis.credentials.jwt import JwtRefusal, JwtVerifier, KeysNeeded
from portcullis.credentials.rfc9449 import DpopNonces, DpopRefusal, DpopVerifier, proof_from_headers
from portcullis.exchange import Exchange, Principal
from portcullis.netutil import TrustedProxies, client_scheme
from portcullis.problems import Problem, bearer_challenge
from portcullis.storage.protocols import ApiKeyRecord, KeyStore, RevocationStore
from portcullis.tls import cert_thumbprint
from portcullis.traffic.protocols import BackendUnavailable, ReplayCache

log = logging.getLogger("portcullis.keys")
# A key is 51 characters; anything much longer is refused before any work.
MAX_CREDENTIAL_LEN = 512


class KeyCache:
    """All key records in memory, refreshed when the store's revision changes.

    The poller asks the store for one integer every `interval` seconds, so a key
    revoked by `portcullis keys revoke` (another process) is refused within that
    interval. If the store cannot be read, the cache keeps its last state and logs:
    keys that were revoked before the outage stay revoked (fail closed on them).
    """

    def __init__(self, store: KeyStore, interval: float = 0.25, revocations: RevocationStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._interval = interval
        self._revocation_store = revocations
        self._clock = clock
        self._records: dict[str, ApiKeyRecord] = {}
        # kind -> value -> expiry (inf: never lapses); checked against the clock at lookup.
        self._revoked: dict[str, dict[str, float]] = {"jti": {}, "sub": {}, "client": {}}
        self._revision = -1
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        rev = self._store.revision()
        self._records = {r.key_id: r for r in self._store.list()}
        if self._revocation_store is not None:
            entries = self._revocation_store.revocations(self._clock())
            self._revoked = {kind: {e.value: e.expires_at if e.expires_at is not None else math.inf
                                    for e in entries if e.kind == kind} for kind in ("jti", "sub", "client")}
        self._revision = rev

    def revoked(self, p: Principal) -> str | None:
        """The audit reason if `p`'s token, subject or client is revoked, else None."""
        r = self._revoked
        now = self._clock()
        if r["jti"].get(p.credential_id, 0.0) > now:
            return "jwt.revoked_token"
        if r["sub"].get(p.subject, 0.0) > now:
            return "jwt.revoked_subject"
        if p.client_id is not None and r["client"].get(p.client_id, 0.0) > now:
            return "jwt.revoked_client"
        return None

    def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._records.get(key_id)

    async def refresh_if_changed(self) -> bool:
        rev = await asyncio.to_thread(self._store.revision)
        if rev == self._revision:
            return False
        await asyncio.to_thread(self.load)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh_if_changed()
            except Exception as exc:  # the loop must survive a store outage
                log.warning("key store poll failed: %s", type(exc).__name__)

    def start(self) -> None:
        self.load()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _invalid(reason: str, detail: str = "The credential is not valid.") -> Problem:
    return Problem(401, "invalid-credential", reason, detail,
                   headers=[bearer_challenge("invalid_token", detail.rstrip("."))])


class AuthenticateStage:
    """Turns an API key into a Principal; public routes pass through untouched."""

    name: ClassVar[str] = "authenticate"

    def __init__(self, keys: KeyCache, hasher: apikeys.KeyHasher, *,
                 clock: Callable[[], float] = time.time, jwt: JwtVerifier | None = None,
                 introspector: Introspector | None = None, trusted: TrustedProxies | None = None,
                 client_cert_header: str | None = None, dpop: DpopVerifier | None = None,
                 dpop_nonces: DpopNonces | None = None, signatures_enabled: bool = False,
                 replay: ReplayCache | None = None) -> None:
        self._signatures_enabled = signatures_enabled
        # Shared across gateway nodes (Redis): a proof's jti replayed at another node is
        # refused too. The in-process cache of the verifier stays the first check.
        self._replay = replay
        self._dpop = dpop
        self._dpop_nonces = dpop_nonces
        self._trusted = trusted
        self._cert_header = client_cert_header.encode() if client_cert_header else None
        self._keys = keys
        self._hasher = hasher
        self._clock = clock
        self._jwt = jwt
        self._introspector = introspector

    @staticmethod
    def _presented(ex: Exchange) -> tuple[bytes, str] | Problem | None:
        """The credential and how it came: ``bearer``, ``dpop`` (RFC 9449 §7.1) or ``x-api-key``."""
        auth: list[bytes] = []
        xkey: list[bytes] = []
        for k, v in ex.headers:
            if k == b"authorization":
                auth.append(v)
            elif k == b"x-api-key":
                xkey.append(v)
        if len(auth) > 1 or len(xkey) > 1 or (auth and xkey):
            # RFC 6750 §3.1 invalid_request: more than one credential is ambiguous.
            return Problem(400, "bad-request", "auth.multiple_credentials",
                           "Present exactly one credential.",
                           headers=[bearer_challenge("invalid_request")])
        if xkey:
            return xkey[0].strip(), "x-api-key"
        if auth:
            scheme, _, token = auth[0].strip().partition(b" ")
            kind = scheme.lower()
            if kind not in (b"bearer", b"dpop"):
                return Problem(401, "unauthenticated", "auth.unsupported_scheme",
                               "Use the Bearer or DPoP scheme.", headers=[bearer_challenge()])
            return token.strip(), kind.decode()
        return None

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None or route.config.public:
            return None
        found = self._presented(ex)
        if isinstance(found, Problem):
            return found
        if found is None or not found[0]:
            return Problem(401, "unauthenticated", "auth.missing", "This route requires a credential.",
                           headers=[bearer_challenge()])
        presented, how = found
        methods = route.config.auth
        if how == "dpop" and self._dpop is None:
            return Problem(401, "unauthenticated", "auth.unsupported_scheme", "Use the Bearer scheme.",
                           headers=[bearer_challenge()])
        if how in ("bearer", "dpop") and not presented.startswith(b"pcl_"):
            ex.facts["dpop"] = how == "dpop"
            # A JWT has exactly two dots; anything else is an opaque token (RFC 7662).
            if presented.count(b".") == 2 and "jwt" in methods and self._jwt is not None:
                return await self._token_principal(ex, presented, self._jwt.verify, jwt=self._jwt)
            if "introspection" in methods and self._introspector is not None:
                return await self._token_principal(ex, presented, self._introspector.verify)
            if "jwt" in methods and self._jwt is not None and "api_key" not in methods:
                return await self._token_principal(ex, presented, self._jwt.verify, jwt=self._jwt)
        if how == "dpop":
            return _invalid("auth.dpop_not_for_api_keys")
        if "api_key" not in methods:
            return _invalid("auth.method_not_allowed")
        if len(presented) > MAX_CREDENTIAL_LEN:
            return _invalid("auth.credential_too_long")
        try:
            token = presented.decode("ascii")
        except UnicodeDecodeError:
            return _invalid(apikeys.KeyFormatError.MALFORMED.value)
        parsed = apikeys.parse(token)
        if isinstance(parsed, apikeys.KeyFormatError):
            return _invalid(parsed.value)
        record = self._keys.get(parsed)
        if record is None:
            self._hasher.digest(token)  # same work as a known key: no timing oracle on ids
            return _invalid("auth.key_unknown")
        if not self._hasher.matches(token, record.key_hash):
            return _invalid("auth.key_mismatch")
        ex.facts["credential_id"] = record.key_id
        if record.revoked_at is not None:
            return _invalid("auth.key_revoked")
        if record.expires_at is not None and self._clock() >= record.expires_at:
            return _invalid("auth.key_expired", "The credential has expired.")
        if record.signing_key_id is not None and not self._signatures_enabled:
            # Fail closed: the key must sign its requests, and nothing here could check it.
            return _invalid("sig.not_configured", "This credential's requests must be signed.")
        rl = record.rate_limit
        ex.principal = Principal(
            subject=f"key:{record.name}",
            tenant=record.tenant,
            credential_id=record.key_id,
            credential_kind="api_key",
            scopes=record.scopes,
            roles=record.roles,
            rate_limit=(rl.requests, rl.per_seconds, rl.burst) if rl else None,
            signing_key_id=record.signing_key_id,
        )
        return None

    async def _token_principal(self, ex: Exchange, token: bytes,
                               verify: Callable[[bytes], Awaitable[Principal]],
                               jwt: JwtVerifier | None = None) -> Problem | None:
        """With `jwt`, its `verify_now` answers without a coroutine unless it raises
        `KeysNeeded` (the issuer's keys must be fetched): then `resume` finishes it."""
        # RFC 9449 §7.1: a request made with the DPoP scheme is answered with DPoP challenges.
        refuse = self._dpop_token_refusal if ex.facts.get("dpop") else _invalid
        try:
            if jwt is None:
                principal = await verify(token)
            else:
                try:
                    principal = jwt.verify_now(token)
                except KeysNeeded as need:
                    principal = await jwt.resume(token, need)
        except JwtRefusal as refusal:
            if refusal.reason in ("jwt.jwks_unavailable", "introspection.unavailable"):
                # Fail closed, but say it is our side: the issuer's keys cannot be had.
                return Problem(503, "service-unavailable", refusal.reason,
                               "Access tokens cannot be verified right now; retry shortly.",
                               headers=[(b"retry-after", b"5")])
            return refuse(refusal.reason, refusal.detail)
        # Checked on every request, after the verified-token cache: a revocation takes
        # effect within one poll of the store, whatever the token's `exp`.
        revoked = self._keys.revoked(principal)
        if revoked is not None:
            return refuse(revoked, "The credential is not valid.")
        route = ex.route
        if route is not None and route.config.audience is not None and route.config.audience not in principal.audiences:
            # A per-route audience, beyond the issuer's (RFC 7519 §4.1.3, RFC 8707 resources).
            return refuse("auth.route_audience", "The credential is not valid.")
        if principal.cnf_x5t is not None:
            # RFC 8705 §3: a certificate-bound token is valid only with that certificate.
            der = self._client_cert(ex)
            if der is None:
                return refuse("auth.cert_required", "This token must be presented over mutual TLS.")
            if not hmac.compare_digest(cert_thumbprint(der), principal.cnf_x5t):
                return refuse("auth.cert_mismatch", "The credential is not valid.")
        if ex.facts.get("dpop"):
            problem = await self._check_dpop(ex, token, principal)
            if problem is not None:
                return problem
        elif principal.cnf_jkt is not None:
            # RFC 9449 §7.1: a DPoP-bound token presented as a Bearer token is refused.
            return _invalid("auth.dpop_required", "This token must be presented with a DPoP proof.")
        ex.principal = principal
        return None

    async def _check_dpop(self, ex: Exchange, token: bytes, principal: Principal) -> Problem | None:
        """RFC 9449 §7.1: a DPoP-bound token and a valid proof of its key for this request."""
        assert self._dpop is not None
        if principal.cnf_jkt is None:
            return self._dpop_problem("auth.dpop_unbound_token", "invalid_token",
                                      "The access token is not DPoP-bound.")
        try:
            proof = proof_from_headers(ex.headers)
            result = self._dpop.verify(proof, method=ex.method, url=self._request_url(ex), access_token=token,
                                       expected_jkt=principal.cnf_jkt)
        except DpopRefusal as refusal:
            return self._dpop_problem(refusal.reason, refusal.error, refusal.detail, refusal.use_dpop_nonce)
        # RFC 9449 §11.1 across nodes; a cache that cannot answer refuses (fail closed):
        # 503 and retry, since the proof itself may be fine (not a 500 "internal error").
        try:
            fresh = self._replay is None or await self._replay.first_use(
                "dpop", f"{result.jkt}|{result.jti}", self._dpop.replay.ttl)
        except BackendUnavailable:
            return Problem(503, "service-unavailable", "dpop.replay_unavailable",
                           "DPoP proofs cannot be checked right now; retry shortly.",
                           headers=[(b"retry-after", b"1")])
        if not fresh:
            return self._dpop_problem("dpop.replay", "invalid_dpop_proof", "The DPoP proof was already used.")
        return None

    def _dpop_token_refusal(self, reason: str, detail: str) -> Problem:
        """A refused access token on a DPoP request: `invalid_token` in a DPoP challenge."""
        return self._dpop_problem(reason, "invalid_token", detail)

    def _dpop_problem(self, reason: str, error: str, detail: str, nonce: bool = False) -> Problem:
        assert self._dpop is not None
        headers = [self._dpop.challenge(error, detail.rstrip("."))]
        if nonce and self._dpop_nonces is not None:
            headers.append(self._dpop_nonces.header())  # §8: a fresh nonce to retry with
        return Problem(401, "invalid-credential", reason, detail, headers=headers)

    def _request_url(self, ex: Exchange) -> str:
        """The URL the client addressed (the DPoP `htu`): our scheme, or a trusted proxy's."""
        scheme = client_scheme(str(ex.scope.get("scheme", "http")), ex.facts.get("peer", ""),
                               ex.header(b"x-forwarded-proto"), self._trusted)
        return f"{scheme}://{ex.host or 'localhost'}{ex.raw_path.decode('ascii')}"

    def _client_cert(self, ex: Exchange) -> bytes | None:
        return client_certificate(ex, self._cert_header, self._trusted)


def client_certificate(ex: Exchange, cert_header: bytes | None, trusted: TrustedProxies | None) -> bytes | None:
    """The client certificate (DER): from our own TLS connection, or from a trusted
    TLS-terminating proxy's header (never from anyone else)."""
    tls = ex.scope.get("extensions", {}).get("tls")
    if tls is not None and tls.get("client_cert_der"):
        return bytes(tls["client_cert_der"])
    if cert_header is None or trusted is None:
        return None
    if not trusted.is_trusted(ex.facts.get("peer", "")):
        return None
    values = [v for k, v in ex.headers if k == cert_header]
    if len(values) != 1 or len(values[0]) > 16384:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(unquote(values[0].decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None
