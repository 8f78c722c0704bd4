"""Authorizations ("families") and refresh tokens: rotation with reuse detection.

One authorization is created per redeemed code; it records who logged in (the
`LoginState` facts, kept unchanged across refreshes so `acr`/`amr`/`auth_time` never
grow), the scope, the DPoP key, and every token issued under it: the refresh tokens
(keyed hashes, never the tokens) and the access tokens' `jti`s. Revoking it revokes
all of them; the gateway refuses the access tokens through the revocation store.

Rules (RFC 9700 §4.14.2, OAuth 2.1 §4.3.1, RFC 6749 §6):
- a refresh token is rotated on every use: the presented one is spent atomically
  (one `UPDATE ... WHERE spent_at IS NULL`), so of two concurrent refreshes exactly one
  wins; the loser is treated as a reuse;
- presenting a spent refresh token revokes the whole family (RFC 9700 §4.14.2: "the
  authorization server cannot determine which party submitted the invalid refresh
  token [...] it will revoke the active refresh token");
- idle lifetime (`refresh_idle_seconds` since the token was issued) and absolute lifetime
  (`refresh_absolute_seconds` since the family started);
- scope on refresh may only narrow (RFC 6749 §6, checked by Authlib's grant);
- a public client's DPoP-bound family needs a proof with the same key (RFC 9449 §5);
  a confidential client's DPoP-bound family needs a DPoP proof (no downgrade to bearer).

Refresh tokens are issued when the client has the ``refresh_token`` grant and, for an
OpenID Connect request (scope ``openid``), only when ``offline_access`` was granted
(OIDC Core §11); a plain OAuth request needs only the grant (`wants_refresh_token`).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import InvalidGrantError
from authlib.oauth2.rfc6749.grants import RefreshTokenGrant

from portcullis.oauth import db
from portcullis.oauth.models import AUTH_METHODS, LoginState
from portcullis.oauth.rfc9068 import InvalidTargetError
from portcullis.storage.protocols import RevocationRecord, RevocationStore

if TYPE_CHECKING:
    from portcullis.credentials.apikeys import KeyHasher
    from portcullis.oauth.config import AuthServerConfig
    from portcullis.oauth.server import OAuthRequest

log = logging.getLogger("portcullis.oauth.refresh")

#: Longest refresh token we look up (ours are far shorter): bounds the hash input.
MAX_TOKEN_CHARS = 512

authorizations = sa.Table(
    "oauth_authorizations", db.metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("client_id", sa.String(64), nullable=False, index=True),
    sa.Column("user_id", sa.String(200), nullable=False, index=True),
    sa.Column("tenant", sa.String(100), nullable=False),
    sa.Column("login", sa.Text, nullable=False),          # JSON LoginState
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("resources", sa.Text, nullable=False),      # JSON list (RFC 8707)
    sa.Column("dpop_jkt", sa.String(128), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("absolute_expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("revoked_reason", sa.String(64), nullable=True),
)

refresh_tokens = sa.Table(
    "oauth_refresh_tokens", db.metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("authorization_id", sa.String(64), sa.ForeignKey("oauth_authorizations.id"), nullable=False,
              index=True),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("spent_at", sa.Float, nullable=True),
)

issued_tokens = sa.Table(
    "oauth_issued_tokens", db.metadata,
    sa.Column("jti", sa.String(128), primary_key=True),
    sa.Column("authorization_id", sa.String(64), sa.ForeignKey("oauth_authorizations.id"), nullable=False,
              index=True),
    sa.Column("expires_at", sa.Float, nullable=False),
)


def login_to_json(login: LoginState) -> str:
    return db.dumps(asdict(login))


def login_from_json(text: str) -> LoginState:
    d = json.loads(text)
    return LoginState(session_id=str(d["session_id"]), user_id=str(d["user_id"]), username=str(d["username"]),
                      tenant=str(d["tenant"]), roles=tuple(d["roles"]), auth_time=float(d["auth_time"]),
                      amr=tuple(d["amr"]), acr=str(d["acr"]))


def jwt_facts(token: str) -> tuple[str, float] | None:
    """`jti` and `exp` of a JWT access token this server just signed (not verified:
    it is ours, straight from the generator); None if it has neither."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16384:
        return None
    try:
        seg = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(seg))
    except (ValueError, UnicodeDecodeError):
        return None
    jti, exp = claims.get("jti") if isinstance(claims, dict) else None, claims.get("exp")
    if not isinstance(jti, str) or not isinstance(exp, int | float):
        return None
    return jti, float(exp)


def wants_refresh_token(client_grants: tuple[str, ...], scope: str) -> bool:
    """Our policy: the client has the grant, and an OIDC request asked for `offline_access`."""
    scopes = scope.split()
    return "refresh_token" in client_grants and ("openid" not in scopes or "offline_access" in scopes)


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    """A stored refresh token and its family, as Authlib's grant sees a token."""

    token_hash: str
    authorization_id: str
    client_id: str
    scope: str
    login: LoginState
    resources: tuple[str, ...]
    dpop_jkt: str | None
    created_at: float
    spent_at: float | None
    family_created_at: float
    absolute_expires_at: float
    revoked_at: float | None

    # --- what Authlib's RefreshTokenGrant calls ---
    def get_scope(self) -> str:
        return self.scope

    def check_client(self, client: Any) -> bool:
        return bool(client.get_client_id() == self.client_id)


@dataclass(frozen=True, slots=True)
class GrantSummary:
    """One app a user authorized: for the granted-apps page and the CLI."""

    client_id: str
    scope: str
    created_at: float
    families: int


class Grants:
    """The authorization/refresh store. `clock` is the server's (tests inject one)."""

    def __init__(self, adb: db.AuthDb, hasher: KeyHasher, revocations: RevocationStore,
                 cfg: AuthServerConfig, clock: Callable[[], float]) -> None:
        self._db = adb
        self._hasher = hasher
        self._revocations = revocations
        self._cfg = cfg
        self._clock = clock

    def hash(self, token: str) -> str:
        return self._hasher.digest("refresh:" + token)

    def revoked_by_operator(self, user_id: str, client_id: str, now: float) -> str | None:
        """The kind ("sub" or "client") of a gateway revocation in force that covers this
        family's user or client (`portcullis tokens revoke --sub/--client`), else None:
        what stops a subject's access tokens stops its refresh tokens too."""
        for r in self._revocations.revocations(now):
            if (r.kind == "sub" and r.value == user_id) or (r.kind == "client" and r.value == client_id):
                return r.kind
        return None

    # --- writes ---
    def start(self, *, client_id: str, login: LoginState, scope: str, resources: list[str],
              dpop_jkt: str | None, conn: sa.Connection | None = None) -> str:
        """A new family for one redeemed code; returns its id."""
        now = self._clock()
        fid = "fam_" + secrets.token_urlsafe(18)
        values = {"id": fid, "client_id": client_id, "user_id": login.user_id, "tenant": login.tenant,
                  "login": login_to_json(login), "scope": scope, "resources": db.dumps(resources),
                  "dpop_jkt": dpop_jkt, "created_at": now,
                  "absolute_expires_at": now + self._cfg.refresh_absolute_seconds}
        if conn is not None:
            conn.execute(authorizations.insert().values(**values))
        else:
            with self._db.begin() as c:
                c.execute(authorizations.insert().values(**values))
        return fid

    def record(self, family_id: str, *, access_token: str | None, refresh_token: str | None, scope: str) -> None:
        """Record what was just issued under `family_id`. If the family was revoked
        meanwhile (a concurrent reuse), the new access token is revoked at once."""
        now = self._clock()
        facts = jwt_facts(access_token) if access_token else None
        with self._db.begin() as conn:
            # Writes first: the transaction holds SQLite's write lock before it reads.
            if facts is not None:
                conn.execute(issued_tokens.insert().values(jti=facts[0], authorization_id=family_id,
                                                           expires_at=facts[1]))
            if refresh_token is not None:
                conn.execute(refresh_tokens.insert().values(token_hash=self.hash(refresh_token),
                                                            authorization_id=family_id, scope=scope, created_at=now))
            # Locked read (PostgreSQL: FOR NO KEY UPDATE; SQLite holds the write lock
            # already): a concurrent `revoke` either committed first (we see revoked_at
            # and revoke the new token below) or waits for this commit (its read of
            # issued_tokens then sees the jti). An unlocked read under READ COMMITTED
            # could miss both ways and leave the new access token live.
            revoked = conn.execute(sa.select(authorizations.c.revoked_at, authorizations.c.revoked_reason).where(
                authorizations.c.id == family_id).with_for_update(key_share=True)).first()
        if revoked is not None and revoked.revoked_at is not None and facts is not None:
            self._revoke_jtis([facts], now, revoked.revoked_reason or "oauth.grant_revoked")

    def spend(self, token_hash: str) -> bool:
        """Mark a refresh token used; False when it already was (someone else won)."""
        now = self._clock()
        with self._db.begin() as conn:
            n = conn.execute(refresh_tokens.update().where(
                (refresh_tokens.c.token_hash == token_hash) & refresh_tokens.c.spent_at.is_(None)
            ).values(spent_at=now)).rowcount
        return n == 1

    def revoke(self, family_id: str, reason: str) -> int:
        """Revoke a family: its refresh tokens stop working and its access tokens are
        revoked at the gateway. Returns the number of access tokens revoked."""
        now = self._clock()
        with self._db.begin() as conn:
            conn.execute(authorizations.update().where(
                (authorizations.c.id == family_id) & authorizations.c.revoked_at.is_(None)
            ).values(revoked_at=now, revoked_reason=reason[:64]))
            rows = conn.execute(sa.select(issued_tokens.c.jti, issued_tokens.c.expires_at).where(
                (issued_tokens.c.authorization_id == family_id) & (issued_tokens.c.expires_at > now))).all()
        log.info("authorization revoked", extra={"family": family_id, "reason": reason})
        return self._revoke_jtis([(r.jti, float(r.expires_at)) for r in rows], now, reason)

    def _revoke_jtis(self, jtis: list[tuple[str, float]], now: float, reason: str) -> int:
        n = 0
        for jti, exp in jtis:
            # An entry lapses once the token it covers has expired (plus skew).
            self._revocations.revoke_tokens(RevocationRecord("jti", jti, now, exp + 60, reason))
            n += 1
        return n

    def revoke_user(self, user_id: str, client_id: str | None = None, reason: str = "oauth.grant_revoked") -> int:
        """Revoke every live family of `user_id` (for one client, or all); returns how many."""
        cond = (authorizations.c.user_id == user_id) & authorizations.c.revoked_at.is_(None)
        if client_id is not None:
            cond &= authorizations.c.client_id == client_id
        with self._db.engine.connect() as conn:
            ids = [r.id for r in conn.execute(sa.select(authorizations.c.id).where(cond))]
        for fid in ids:
            self.revoke(fid, reason)
        return len(ids)

    def revoke_client(self, client_id: str, reason: str = "oauth.client_revoked") -> int:
        """Revoke every live family of a client (e.g. when the client is revoked)."""
        with self._db.engine.connect() as conn:
            ids = [r.id for r in conn.execute(sa.select(authorizations.c.id).where(
                (authorizations.c.client_id == client_id) & authorizations.c.revoked_at.is_(None)))]
        for fid in ids:
            self.revoke(fid, reason)
        return len(ids)

    # --- reads ---
    def lookup(self, token: str) -> RefreshRecord | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        j = refresh_tokens.join(authorizations, refresh_tokens.c.authorization_id == authorizations.c.id)
        with self._db.engine.connect() as conn:
            r = conn.execute(sa.select(refresh_tokens, authorizations).select_from(j).where(
                refresh_tokens.c.token_hash == self.hash(token))).first()
        if r is None:
            return None
        m = r._mapping
        return RefreshRecord(
            token_hash=m[refresh_tokens.c.token_hash], authorization_id=m[authorizations.c.id],
            client_id=m[authorizations.c.client_id], scope=m[refresh_tokens.c.scope],
            login=login_from_json(m[authorizations.c.login]),
            resources=tuple(db.loads_list(m[authorizations.c.resources])), dpop_jkt=m[authorizations.c.dpop_jkt],
            created_at=float(m[refresh_tokens.c.created_at]),
            spent_at=m[refresh_tokens.c.spent_at], family_created_at=float(m[authorizations.c.created_at]),
            absolute_expires_at=float(m[authorizations.c.absolute_expires_at]),
            revoked_at=m[authorizations.c.revoked_at],
        )

    def expiry(self, rec: RefreshRecord) -> float:
        """When `rec` stops working if unused: idle or absolute limit, whichever is first."""
        return min(rec.created_at + self._cfg.refresh_idle_seconds, rec.absolute_expires_at)

    def login_for_jti(self, jti: str) -> tuple[LoginState, str] | None:
        """The login and client behind an access token we issued under a family."""
        j = issued_tokens.join(authorizations, issued_tokens.c.authorization_id == authorizations.c.id)
        with self._db.engine.connect() as conn:
            r = conn.execute(sa.select(authorizations.c.login, authorizations.c.client_id,
                                       authorizations.c.revoked_at).select_from(j).where(
                issued_tokens.c.jti == jti)).first()
        if r is None or r.revoked_at is not None:
            return None
        return login_from_json(r.login), str(r.client_id)

    def user_grants(self, user_id: str) -> list[GrantSummary]:
        """Live families of a user, per client."""
        with self._db.engine.connect() as conn:
            rows = conn.execute(sa.select(authorizations.c.client_id, authorizations.c.scope,
                                          authorizations.c.created_at).where(
                (authorizations.c.user_id == user_id) & authorizations.c.revoked_at.is_(None)
                & (authorizations.c.absolute_expires_at > self._clock()))).all()
        out: dict[str, GrantSummary] = {}
        for r in rows:
            prev = out.get(r.client_id)
            scope = " ".join(sorted(set(r.scope.split()) | set(prev.scope.split() if prev else [])))
            out[r.client_id] = GrantSummary(r.client_id, scope, min(float(r.created_at), prev.created_at)
                                            if prev else float(r.created_at), (prev.families if prev else 0) + 1)
        return list(out.values())

    # --- RFC 7009 / RFC 7662 hooks (ctx.token_revokers / ctx.token_introspectors) ---
    def revoker(self, token: str, client_id: str) -> bool:
        """RFC 7009 §2.1: revoking a refresh token revokes its family ("the authorization
        server [...] SHOULD also invalidate all access tokens based on the same
        authorization grant"). A token of another client is recognised but left alone."""
        rec = self.lookup(token)
        if rec is None:
            return False
        if rec.client_id == client_id:
            self.revoke(rec.authorization_id, "oauth.refresh_revoked")
        return True

    def introspector(self, token: str) -> dict[str, Any] | None:
        """RFC 7662 §2.2 for our refresh tokens; None for tokens that are not ours."""
        rec = self.lookup(token)
        if rec is None:
            return None
        now = self._clock()
        exp = self.expiry(rec)
        if rec.spent_at is not None or rec.revoked_at is not None or now >= exp:
            return {"active": False}
        return {"active": True, "token_type": "refresh_token", "client_id": rec.client_id, "scope": rec.scope,
                "sub": rec.login.user_id, self._cfg.tenant_claim: rec.login.tenant, "iss": self._cfg.issuer,
                "iat": int(rec.created_at), "exp": int(exp)}


class RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    """Authlib's refresh grant with rotation, reuse detection, lifetimes and DPoP binding.

    Bound to its collaborators by `bind_refresh_grant` (Authlib instantiates grants per
    request with `(request, server)`). `after_issue` adds the ID token (oidc.py).
    """

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = list(AUTH_METHODS)
    INCLUDE_NEW_REFRESH_TOKEN = True
    grants: Grants
    cfg: AuthServerConfig
    clock: Callable[[], float]
    after_issue: Callable[[dict[str, Any], RefreshRecord, OAuthRequest], None] | None = None

    def _reuse(self, rec: RefreshRecord, why: str) -> None:
        self.request.as_request.audit["refresh_reuse"] = True
        self.request.as_request.audit["family_revoked"] = why
        self.grants.revoke(rec.authorization_id, "oauth.refresh_reuse")

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshRecord | None:
        rec = self.grants.lookup(refresh_token)
        client = self.request.client
        if rec is None or not rec.check_client(client):
            return None
        self.request.as_request.audit["family"] = rec.authorization_id
        if rec.revoked_at is not None:
            self.request.as_request.audit["refresh"] = "family_revoked"
            return None
        if rec.spent_at is not None:
            # RFC 9700 §4.14.2: a spent token presented again revokes the family.
            self._reuse(rec, "spent_token_presented")
            return None
        now = self.clock()
        kind = self.grants.revoked_by_operator(rec.login.user_id, client.client_id, now)
        if kind is not None:
            self.request.as_request.audit["refresh"] = f"revoked_{kind}"
            return None
        if now >= rec.created_at + self.cfg.refresh_idle_seconds:
            self.request.as_request.audit["refresh"] = "idle_expired"
            return None
        if now >= rec.absolute_expires_at:
            self.request.as_request.audit["refresh"] = "absolute_expired"
            return None
        if rec.dpop_jkt is not None:
            presented = self.request.dpop_jkt
            if presented is None:
                raise InvalidGrantError("This refresh token is DPoP-bound: send a DPoP proof.")
            # RFC 9449 §5: a public client's refresh token is bound to its DPoP key.
            if client.is_public and presented != rec.dpop_jkt:
                raise InvalidGrantError("The DPoP proof's key does not match the refresh token's.")
        return rec

    def authenticate_user(self, refresh_token: RefreshRecord) -> LoginState:
        return refresh_token.login

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        rec: RefreshRecord = self.request.refresh_token
        # RFC 8707 §2.2: a refresh may name a subset of the originally granted resources.
        asked = list(self.request.resources)
        if asked and rec.resources and not set(asked) <= set(rec.resources):
            raise InvalidTargetError(description="The resource was not part of the original grant.")
        if not asked:
            self.request.resources = list(rec.resources)
        # Spend first, atomically: of two concurrent refreshes one wins, the other is a reuse.
        if not self.grants.spend(rec.token_hash):
            self._reuse(rec, "concurrent_refresh")
            raise InvalidGrantError("The refresh token was already used.")
        user = rec.login  # the original login facts: acr, amr, auth_time never change on refresh
        self.request.user = user
        scope = self.request.payload.scope or rec.scope
        token: dict[str, Any] = self.generate_token(user=user, scope=scope, include_refresh_token=True)
        if self.after_issue is not None:
            self.after_issue(token, rec, self.request)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def revoke_old_credential(self, refresh_token: RefreshRecord) -> None:
        """Spent in `create_token_response` before issuing (atomic)."""


def bind_refresh_grant(grants: Grants, cfg: AuthServerConfig, clock: Callable[[], float],
                       after_issue: Callable[[dict[str, Any], RefreshRecord, OAuthRequest], None] | None = None,
                       ) -> type[RefreshGrant]:
    """A `RefreshGrant` subclass carrying its collaborators (Authlib builds grants per request)."""
    return type("BoundRefreshGrant", (RefreshGrant,), {
        "grants": grants, "cfg": cfg, "clock": staticmethod(clock), "after_issue": staticmethod(after_issue)
        if after_issue is not None else None})
