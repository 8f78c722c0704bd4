"""Client authentication at the token, introspection and revocation endpoints.

Registered with Authlib's `ClientAuthentication` (`server.register_client_auth_method`),
replacing its built-in secret methods so each failure carries its own audit reason:

==================================  ==================================================
method                              rule
==================================  ==================================================
client_secret_basic / _post         RFC 6749 §2.3.1; the secret is compared as a keyed
                                    hash (`Client.check_client_secret`)
private_key_jwt                     RFC 7523 §2.2 and §3 (OIDC Core §9): a JWT signed
                                    with one of the client's registered keys
tls_client_auth                     RFC 8705 §2.1: a verified client certificate whose
                                    subject DN is the registered one
self_signed_tls_client_auth         RFC 8705 §2.2: the certificate's public key is one
                                    of the client's registered keys
none                                public clients (Authlib's own; PKCE is then required)
==================================  ==================================================

Failures raise `InvalidClientError` with one client-safe description; the precise cause
(``oauth.client_auth.bad_secret``, ``.assertion_replay``, ``.cert_mismatch``, ...) goes to
the audit event through `AsRequest.audit["failure"]`, never to the response.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import unquote_plus

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import InvalidClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import IntegrityError

from portcullis.credentials.jwt import (
    IssuerKeys,
    alg_fits_key,
    audiences,
    b64decode,
    import_keys,
    verify_signature,
)
from portcullis.oauth import db
from portcullis.oauth.http import AsRequest
from portcullis.oauth.models import Client
from portcullis.oauth.server import AuthorizationServer, OAuthRequest

#: RFC 7523 §2.2.
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Asymmetric algorithms only (RFC 8725 §3.1): no `none`, no HMAC with a shared secret.
ASSERTION_ALGS = ("ES256", "EdDSA", "PS256", "RS256")
MAX_ASSERTION_BYTES = 8192
#: "exp ... short": an assertion may be valid for at most this long from now.
MAX_ASSERTION_LIFETIME = 300
LEEWAY = 30
MAX_JTI = 256

CONFIDENTIAL_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
                        "self_signed_tls_client_auth"]
#: Public clients (`none`) after the confidential ones, for grants that admit them.
ALL_METHODS = [*CONFIDENTIAL_METHODS, "none"]

assertion_jtis = sa.Table(
    "oauth_assertion_jtis", db.metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("jti", sa.String(MAX_JTI), primary_key=True),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
)

QueryClient = Callable[[str], Client | None]


def _fail(request: OAuthRequest, reason: str, client_id: str | None = None) -> NoReturn:
    request.as_request.audit["failure"] = f"oauth.client_auth.{reason}"
    if client_id is not None:
        request.as_request.audit.setdefault("client_id", client_id[:128])
    raise InvalidClientError(status_code=401, description="Client authentication failed.")


def presented_methods(req: AsRequest) -> list[str]:
    """Which credential kinds the request carries (RFC 6749 §2.3: at most one)."""
    found = []
    if req.headers.get("authorization", "")[:6].lower() == "basic ":
        found.append("basic")
    form = req.form
    if "client_secret" in form:
        found.append("secret")
    if "client_assertion" in form or "client_assertion_type" in form:
        found.append("assertion")
    return found


def basic_credentials(header: str) -> tuple[str, str] | None:
    """RFC 6749 §2.3.1: HTTP Basic (RFC 7617) over the form-urlencoded client_id and
    secret; None unless both are there."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(value) > 1024:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    cid, sep, secret = raw.partition(":")
    if not sep:
        return None
    cid, secret = unquote_plus(cid), unquote_plus(secret)
    return (cid, secret) if cid and secret else None


def _method_fits(request: OAuthRequest, client: Client, method: str) -> Client:
    if client.auth_method != method:
        _fail(request, "wrong_method", client.client_id)
    request.as_request.audit["client_id"] = client.client_id
    request.as_request.audit["auth_method"] = method
    return client


class ClientAuthenticator:
    """The methods above, bound to the server's store and clock."""

    def __init__(self, server: AuthorizationServer, adb: db.AuthDb, issuer: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._server = server
        self._db = adb
        self._issuer = issuer
        self._clock = clock
        self._jwks: dict[str, tuple[str, IssuerKeys]] = {}
        self._purged = 0.0

    def install(self) -> None:
        reg = self._server.register_client_auth_method
        reg("client_secret_basic", self.secret_basic)
        reg("client_secret_post", self.secret_post)
        reg("private_key_jwt", self.private_key_jwt)
        reg("tls_client_auth", self.tls_client_auth)
        reg("self_signed_tls_client_auth", self.self_signed_tls_client_auth)

    def _client(self, query_client: QueryClient, request: OAuthRequest, client_id: object) -> Client:
        if not isinstance(client_id, str) or not client_id:
            _fail(request, "missing_client_id")
        client = query_client(client_id)
        if client is None:
            _fail(request, "unknown_client", client_id)  # unknown or revoked
        return client

    # --- RFC 6749 §2.3.1 ---
    def secret_basic(self, query_client: QueryClient, request: OAuthRequest) -> Client | None:
        if "basic" not in presented_methods(request.as_request):
            return None
        parsed = basic_credentials(request.as_request.headers.get("authorization", ""))
        if parsed is None:
            _fail(request, "malformed_basic")
        client_id, secret = parsed
        client = self._client(query_client, request, client_id)
        if not client.check_client_secret(secret):
            _fail(request, "bad_secret", client.client_id)
        return _method_fits(request, client, "client_secret_basic")

    def secret_post(self, query_client: QueryClient, request: OAuthRequest) -> Client | None:
        form = request.as_request.form
        if "client_secret" not in form:
            return None
        client = self._client(query_client, request, form.get("client_id", [None])[0])
        if not client.check_client_secret(form["client_secret"][0]):
            _fail(request, "bad_secret", client.client_id)
        return _method_fits(request, client, "client_secret_post")

    # --- RFC 7523 §2.2 / §3 ---
    def _client_keys(self, client: Client) -> IssuerKeys:
        cached = self._jwks.get(client.client_id)
        if cached is not None and cached[0] == client.jwks:
            return cached[1]
        keys = import_keys(json.loads(client.jwks or "{}"))
        self._jwks[client.client_id] = (client.jwks or "", keys)
        return keys

    def private_key_jwt(self, query_client: QueryClient, request: OAuthRequest) -> Client | None:
        form = request.as_request.form
        if "client_assertion" not in form and "client_assertion_type" not in form:
            return None
        # §2.2: client_assertion_type is this exact URN; client_assertion one JWT.
        if form.get("client_assertion_type", [""])[0] != ASSERTION_TYPE:
            _fail(request, "bad_assertion_type")
        assertion = form.get("client_assertion", [""])[0]
        if len(assertion) > MAX_ASSERTION_BYTES:
            _fail(request, "assertion_too_large")
        parts = assertion.encode("ascii", "replace").split(b".")
        if len(parts) != 3:
            _fail(request, "assertion_malformed")
        try:
            header = json.loads(b64decode(parts[0]))
            claims = json.loads(b64decode(parts[1]))
            sig = b64decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            _fail(request, "assertion_malformed")
        if not isinstance(header, dict) or not isinstance(claims, dict):
            _fail(request, "assertion_malformed")
        alg = header.get("alg")
        if alg not in ASSERTION_ALGS:
            _fail(request, "assertion_alg")
        if "crit" in header:
            _fail(request, "assertion_malformed")
        # §3 (2): sub is the client_id; (1) iss too. A client_id parameter, if sent,
        # must name the same client (RFC 7521 §4.2).
        sub = claims.get("sub")
        client = self._client(query_client, request, sub)
        cid = form.get("client_id", [None])[0]
        if cid is not None and cid != client.client_id:
            _fail(request, "assertion_client_mismatch", client.client_id)
        if client.auth_method != "private_key_jwt":
            _fail(request, "wrong_method", client.client_id)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            _fail(request, "assertion_malformed", client.client_id)
        try:
            keys = self._client_keys(client)
        except (ValueError, TypeError):
            _fail(request, "client_keys_unusable", client.client_id)
        signing_input = parts[0] + b"." + parts[1]
        if not any(verify_signature(alg, k, signing_input, sig) for k, declared in keys.candidates(kid)
                   if alg_fits_key(alg, declared)):
            _fail(request, "assertion_bad_signature", client.client_id)
        if claims.get("iss") != client.client_id:
            _fail(request, "assertion_bad_iss", client.client_id)
        # §3 (3): aud identifies this server: the issuer or the endpoint the assertion
        # was sent to (a single value, so the assertion cannot serve another server too).
        aud = audiences(claims.get("aud"))
        endpoint = self._issuer + request.as_request.path
        if len(aud) != 1 or not aud <= {self._issuer, f"{self._issuer}/oauth2/token", endpoint}:
            _fail(request, "assertion_bad_aud", client.client_id)
        now = self._clock()
        exp = _number(claims.get("exp"))
        # §3 (4): exp is required; we accept only short-lived assertions.
        if exp is None:
            _fail(request, "assertion_no_exp", client.client_id)
        if now >= exp + LEEWAY:
            _fail(request, "assertion_expired", client.client_id)
        if exp - now > MAX_ASSERTION_LIFETIME + LEEWAY:
            _fail(request, "assertion_lifetime", client.client_id)
        for name in ("nbf", "iat"):
            v = claims.get(name)
            if v is not None and ((t := _number(v)) is None or t > now + LEEWAY):
                _fail(request, "assertion_not_yet_valid", client.client_id)
        # §3 (7): jti, and "the authorization server MAY ensure that JWTs are not replayed".
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
            _fail(request, "assertion_no_jti", client.client_id)
        if not self._remember_jti(client.client_id, jti, exp + LEEWAY, now):
            _fail(request, "assertion_replay", client.client_id)
        return _method_fits(request, client, "private_key_jwt")

    def _remember_jti(self, client_id: str, jti: str, expires_at: float, now: float) -> bool:
        """Record a used assertion id; False if it was used before (in any process)."""
        try:
            with self._db.begin() as conn:
                if now - self._purged > 60:
                    conn.execute(assertion_jtis.delete().where(assertion_jtis.c.expires_at < now))
                    self._purged = now
                conn.execute(assertion_jtis.insert().values(client_id=client_id, jti=jti, expires_at=expires_at))
        except IntegrityError:
            with self._db.begin() as conn:
                # An entry past its expiry may linger until the next purge: it no longer
                # counts. Reclaimed with one conditional UPDATE so that of two concurrent
                # requests with the same assertion exactly one wins (on any database).
                n = conn.execute(assertion_jtis.update().where(
                    (assertion_jtis.c.client_id == client_id) & (assertion_jtis.c.jti == jti)
                    & (assertion_jtis.c.expires_at < now)
                ).values(expires_at=expires_at)).rowcount
            return n == 1
        return True

    # --- RFC 8705 §2 ---
    def _cert_client(self, query_client: QueryClient, request: OAuthRequest, method: str) -> Client | None:
        form = request.as_request.form
        if presented_methods(request.as_request) or "client_id" not in form:
            return None
        client = query_client(form["client_id"][0])
        if client is None or client.auth_method != method:
            return None  # another method's turn (or the final invalid_client)
        if request.as_request.client_cert_der is None:
            _fail(request, "cert_missing", client.client_id)
        return client

    def tls_client_auth(self, query_client: QueryClient, request: OAuthRequest) -> Client | None:
        client = self._cert_client(query_client, request, "tls_client_auth")
        if client is None:
            return None
        der = request.as_request.client_cert_der
        assert der is not None
        try:
            subject = x509.load_der_x509_certificate(der).subject
            registered = x509.Name.from_rfc4514_string(client.tls_subject_dn or "")
        except ValueError:
            _fail(request, "cert_unusable", client.client_id)
        # §2.1.2: the subject DN "MUST match" the registered one; compared as RFC 4514 strings
        # of the parsed names, so spacing and attribute-name case do not matter.
        if not hmac.compare_digest(subject.rfc4514_string().encode(), registered.rfc4514_string().encode()):
            _fail(request, "cert_mismatch", client.client_id)
        return _method_fits(request, client, "tls_client_auth")

    def self_signed_tls_client_auth(self, query_client: QueryClient, request: OAuthRequest) -> Client | None:
        client = self._cert_client(query_client, request, "self_signed_tls_client_auth")
        if client is None:
            return None
        der = request.as_request.client_cert_der
        assert der is not None
        try:
            spki = _spki(x509.load_der_x509_certificate(der).public_key())
            keys = self._client_keys(client)
        except (ValueError, TypeError):
            _fail(request, "cert_unusable", client.client_id)
        # §2.2: "the certificate ... matches one of the [registered] keys".
        if not any(hmac.compare_digest(_spki(k), spki) for k, _ in keys.candidates(None)):
            _fail(request, "cert_mismatch", client.client_id)
        return _method_fits(request, client, "self_signed_tls_client_auth")


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _number(v: object) -> float | None:
    """A NumericDate (RFC 7519 §2), or None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None
