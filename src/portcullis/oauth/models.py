"""What the authorization server's modules share: clients, tenants, the login state
of a browser session, and the `Sessions` contract between the authorization endpoint
and the identity pages."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

import sqlalchemy as sa

from portcullis.credentials.apikeys import KeyHasher
from portcullis.oauth import db
from portcullis.oauth.http import AsRequest

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
                     "self_signed_tls_client_auth", "none"]
AUTH_METHODS: tuple[str, ...] = ("client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
                                 "self_signed_tls_client_auth", "none")
GRANT_TYPES: tuple[str, ...] = ("authorization_code", "client_credentials", "refresh_token")
MfaPolicy = Literal["optional", "required", "phishing_resistant"]

@dataclass(frozen=True, slots=True)
class LoginState:
    """Who is logged in to a browser session, and how strongly.

    `amr` uses RFC 8176 values ("pwd", "otp", "hwk", "user", "mfa"); `acr` one of the
    ACR_* classes; `auth_time` is when the user last actively authenticated.
    """

    session_id: str
    user_id: str
    username: str
    tenant: str
    roles: tuple[str, ...]
    auth_time: float
    amr: tuple[str, ...]
    acr: str


class Sessions(Protocol):
    """The identity side's contract with the authorization endpoint."""

    def current(self, req: AsRequest) -> LoginState | None:
        """The live session of this browser, or None (no cookie, expired, revoked)."""
        ...

    def login_url(self, return_to: str, *, force: bool = False, acr: str | None = None) -> str:
        """Where to send the browser to (re-)authenticate, then come back to `return_to`
        (a path on this origin). `force` makes the user authenticate again (prompt=login,
        max_age exceeded); `acr` asks for at least that context class (step-up)."""
        ...


def is_loopback_redirect(uri: str) -> bool:
    """RFC 8252 §7.3: native apps' loopback redirects (http, IP literal host)."""
    try:
        parts = urlsplit(uri)
        return parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def redirect_uri_matches(registered: str, presented: str) -> bool:
    """Exact string match (RFC 9700 §4.1.3), except the port of a loopback IP redirect,
    which a native app picks at run time (RFC 8252 §7.3)."""
    if hmac.compare_digest(registered.encode(), presented.encode()):
        return True
    if not (is_loopback_redirect(registered) and is_loopback_redirect(presented)):
        return False
    r, p = urlsplit(registered), urlsplit(presented)
    try:
        p.port  # noqa: B018 - a malformed port raises
    except ValueError:
        return False
    return (r.scheme, r.hostname, r.path, r.query, r.fragment) == (p.scheme, p.hostname, p.path, p.query, p.fragment)


@dataclass(frozen=True, slots=True)
class Client:
    """A registered OAuth client; implements Authlib's `ClientMixin` contract."""

    client_id: str
    name: str
    tenant: str
    auth_method: str
    grant_types: tuple[str, ...]
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...]
    secret_hash: str | None = None
    jwks: str | None = None
    tls_subject_dn: str | None = None
    require_par: bool = False
    require_dpop: bool = False
    first_party: bool = False
    created_at: float = 0.0
    hasher: KeyHasher | None = field(default=None, repr=False, compare=False)

    @property
    def is_public(self) -> bool:
        return self.auth_method == "none"

    # --- authlib.oauth2.rfc6749.ClientMixin ---
    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # Never guess: a request without redirect_uri is refused by the grant when
        # more than one is registered; with exactly one, RFC 6749 §3.1.2.3 allows it.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return ""
        allowed = set(self.scopes)
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(redirect_uri_matches(r, redirect_uri) for r in self.redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None or self.hasher is None:
            return False
        return self.hasher.matches(client_secret, self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        # OAuth 2.1: the code flow only (no implicit, no hybrid).
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


def new_client_id() -> str:
    return "cl_" + secrets.token_urlsafe(16)


def new_client_secret() -> str:
    return "pcs_" + secrets.token_urlsafe(32)


class ClientExistsError(Exception):
    """A client with that name already exists."""


class ClientDirectory:
    """Clients and tenants, cached in memory and reloaded when the store's revision moves
    (checked at most every `poll_seconds`), so a revoked client is refused within a second."""

    def __init__(self, adb: db.AuthDb, hasher: KeyHasher, poll_seconds: float = 0.5) -> None:
        self._db = adb
        self._hasher = hasher
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._rev = -1
        self._checked = 0.0
        self._clients: dict[str, Client] = {}
        self._tenants: dict[str, MfaPolicy] = {}

    def _fresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._poll:
            return
        with self._lock:
            self._checked = now
            rev = self._db.revision()
            if rev == self._rev:
                return
            with self._db.engine.connect() as conn:
                rows = conn.execute(sa.select(db.clients).where(db.clients.c.revoked_at.is_(None))).all()
                trows = conn.execute(sa.select(db.tenants)).all()
            self._clients = {r.client_id: self._client(r) for r in rows}
            self._tenants = {r.name: r.mfa_policy for r in trows}
            self._rev = rev

    def _client(self, r: sa.Row[object]) -> Client:
        m = r._mapping
        return Client(
            client_id=m["client_id"], name=m["name"], tenant=m["tenant"], auth_method=m["auth_method"],
            grant_types=tuple(db.loads_list(m["grant_types"])), redirect_uris=tuple(db.loads_list(m["redirect_uris"])),
            scopes=tuple(db.loads_list(m["scopes"])), secret_hash=m["secret_hash"], jwks=m["jwks"],
            tls_subject_dn=m["tls_subject_dn"], require_par=bool(m["require_par"]),
            require_dpop=bool(m["require_dpop"]), first_party=bool(m["first_party"]),
            created_at=float(m["created_at"]), hasher=self._hasher,
        )

    def get(self, client_id: str) -> Client | None:
        """The active client with this id, or None (unknown or revoked)."""
        self._fresh()
        return self._clients.get(client_id)

    def by_name(self, name: str) -> Client | None:
        self._fresh()
        return next((c for c in self._clients.values() if c.name == name), None)

    def all(self) -> list[Client]:
        self._fresh()
        return sorted(self._clients.values(), key=lambda c: c.name)

    def tenant_policy(self, tenant: str) -> MfaPolicy | None:
        """The tenant's MFA policy, or None when there is no such tenant."""
        self._fresh()
        return self._tenants.get(tenant)

    def invalidate(self) -> None:
        self._checked = 0.0

    # --- writes (CLI, demo seeding, admin API) ---
    def create_tenant(self, name: str, mfa_policy: MfaPolicy | None = None) -> bool:
        """Create a tenant (MFA policy "optional" unless given), or change an existing
        tenant's policy when one is given; True if it was new."""
        if not name or len(name) > 100:  # the column's length (PostgreSQL enforces it)
            raise ValueError("a tenant name is 1-100 characters")
        with self._db.begin() as conn:
            # The revision bump first: it locks the one revision row (PostgreSQL) or takes
            # SQLite's write lock, so concurrent creations run one after the other and the
            # read below sees the other's tenant (no duplicate-key error).
            self._db.bump(conn)
            exists = conn.execute(sa.select(db.tenants.c.name).where(db.tenants.c.name == name)).first()
            if exists and mfa_policy is not None:
                conn.execute(db.tenants.update().where(db.tenants.c.name == name).values(mfa_policy=mfa_policy))
            elif not exists:
                conn.execute(db.tenants.insert().values(name=name, mfa_policy=mfa_policy or "optional",
                                                        created_at=time.time()))
        self.invalidate()
        return not exists

    def create_client(self, *, name: str, tenant: str, auth_method: str, grant_types: list[str],
                      scopes: list[str], redirect_uris: list[str] | None = None, jwks: str | None = None,
                      tls_subject_dn: str | None = None, require_par: bool = False, require_dpop: bool = False,
                      first_party: bool = False, client_id: str | None = None) -> tuple[Client, str | None]:
        """Register a client; returns it and its secret (shown once; None unless the
        method uses one). Raises ValueError on an inconsistent registration and
        ClientExistsError when the name is taken."""
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"unknown token_endpoint_auth_method {auth_method!r}")
        bad = [g for g in grant_types if g not in GRANT_TYPES]
        if bad or not grant_types:
            raise ValueError(f"grant types must be some of {', '.join(GRANT_TYPES)}")
        if auth_method == "none" and "client_credentials" in grant_types:
            raise ValueError("a public client (auth method none) cannot use client_credentials")
        if "authorization_code" in grant_types and not redirect_uris:
            raise ValueError("authorization_code needs at least one redirect URI")
        for uri in redirect_uris or []:
            p = urlsplit(uri)
            if p.fragment or p.scheme not in ("https", "http") or not p.hostname:
                raise ValueError(f"redirect URI {uri!r}: absolute http(s) without a fragment")
            if p.scheme == "http" and not (is_loopback_redirect(uri) or p.hostname == "localhost"):
                raise ValueError(f"redirect URI {uri!r}: http only for loopback (RFC 9700 §2.1)")
        if auth_method in ("private_key_jwt", "self_signed_tls_client_auth") and not jwks:
            raise ValueError(f"{auth_method} needs the client's public keys (jwks)")
        if auth_method == "tls_client_auth" and not tls_subject_dn:
            raise ValueError("tls_client_auth needs the certificate subject DN")
        if self.tenant_policy(tenant) is None:
            raise ValueError(f"no tenant {tenant!r}")
        # The columns' lengths (PostgreSQL enforces them; SQLite would store anything).
        if not name or len(name) > 200:
            raise ValueError("a client name is 1-200 characters")
        if client_id is not None and not 0 < len(client_id) <= 64:
            raise ValueError("a client_id is 1-64 characters")
        secret = new_client_secret() if auth_method in ("client_secret_basic", "client_secret_post") else None
        cid = client_id or new_client_id()
        with self._db.begin() as conn:
            self._db.bump(conn)  # first: serializes concurrent registrations (see create_tenant)
            if conn.execute(sa.select(db.clients.c.client_id).where(
                    (db.clients.c.name == name) | (db.clients.c.client_id == cid))).first():
                raise ClientExistsError(name)
            conn.execute(db.clients.insert().values(
                client_id=cid, name=name, tenant=tenant,
                secret_hash=self._hasher.digest(secret) if secret else None, auth_method=auth_method,
                grant_types=db.dumps(grant_types), redirect_uris=db.dumps(redirect_uris or []),
                scopes=db.dumps(scopes), jwks=jwks, tls_subject_dn=tls_subject_dn, require_par=require_par,
                require_dpop=require_dpop, first_party=first_party, created_at=time.time(),
            ))
        self.invalidate()
        client = self.get(cid)
        assert client is not None
        return client, secret

    def revoke_client(self, client_id: str) -> bool:
        """Disable a client; False if unknown or already revoked. Its tokens are revoked
        separately (`RevocationStore`, kind "client")."""
        with self._db.begin() as conn:
            n = conn.execute(db.clients.update().where(
                (db.clients.c.client_id == client_id) & db.clients.c.revoked_at.is_(None)
            ).values(revoked_at=time.time())).rowcount
            self._db.bump(conn)
        self.invalidate()
        return bool(n)
