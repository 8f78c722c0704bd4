"""Browser sessions and half-finished logins, server-side (OWASP Session Management).

- A session id is 256 random bits, sent only in the cookie and stored as an HMAC (a
  stolen database holds no usable ids). Every login — including a step-up — issues a new
  id and deletes the one the browser had (fixation, ASVS v5 V7.2.4).
- Idle (`session_idle_seconds` since the last request) and absolute
  (`session_absolute_seconds` since creation) lifetimes, checked on every lookup.
- A login whose first factor passed but whose second is pending is a *flow*, not a
  session: it lives in its own table and cookie for `FLOW_SECONDS`, and `current()`
  never returns it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import sqlalchemy as sa

from portcullis.credentials.acr import ACR_ORDER
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.db import AuthDb
from portcullis.oauth.http import AsRequest
from portcullis.oauth.identity import tables
from portcullis.oauth.identity.cookies import FLOW, SESSION, clear_cookie, cookie_name, set_cookie
from portcullis.oauth.identity.keys import keyed_hash
from portcullis.oauth.models import LoginState

FLOW_SECONDS = 600
LOGIN_PATH = "/account/login"
DEFAULT_RETURN = "/account/security"
MAX_RETURN_TO = 2048


def safe_return_to(value: str | None) -> str | None:
    """`value` if it is a path on this origin (`/x...`), else None. Refuses absolute and
    scheme-relative URLs (`//evil`, `/\\evil`), backslashes and control characters —
    the open-redirect tricks browsers normalise into another host."""
    if not value or len(value) > MAX_RETURN_TO or not value.startswith("/"):
        return None
    if value.startswith("//") or "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme or parts.netloc:
        return None
    return value


@dataclass(frozen=True, slots=True)
class Flow:
    """A login in progress (pre-session)."""

    id_hash: str
    return_to: str
    want_acr: str | None
    force: bool
    user_id: str | None
    amr: tuple[str, ...]
    stage: str  # "start" | "mfa" | "enroll"
    failures: int
    expires_at: float


class SessionStore:
    """Implements the `Sessions` protocol (models.py) and the flow store."""

    def __init__(self, db: AuthDb, cfg: AuthServerConfig, key: bytes, clock: Callable[[], float]) -> None:
        self._db = db
        self._cfg = cfg
        self._key = key
        self._clock = clock
        self.session_cookie = cookie_name(SESSION, cfg.issuer)
        self.flow_cookie = cookie_name(FLOW, cfg.issuer)

    def _hash(self, raw: str) -> str:
        return keyed_hash(self._key, raw)

    # --- Sessions protocol ---
    def current(self, req: AsRequest) -> LoginState | None:
        raw = req.cookies.get(self.session_cookie)
        if not raw or len(raw) > 100:
            return None
        return self.lookup(raw)

    def lookup(self, raw: str) -> LoginState | None:
        """The live session for a cookie value (touching its idle timer), or None."""
        now = self._clock()
        h = self._hash(raw)
        s, u = tables.sessions, tables.users
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(s, u.c.username, u.c.tenant, u.c.roles, u.c.disabled_at)
                               .join(u, u.c.user_id == s.c.user_id).where(s.c.id_hash == h)).first()
        if row is None:
            return None
        m = row._mapping
        if (m["disabled_at"] is not None or now - m["last_seen_at"] > self._cfg.session_idle_seconds
                or now - m["created_at"] > self._cfg.session_absolute_seconds):
            with self._db.begin() as conn:
                conn.execute(s.delete().where(s.c.id_hash == h))
            return None
        if now - m["last_seen_at"] >= 1.0:
            with self._db.begin() as conn:
                conn.execute(s.update().where(s.c.id_hash == h).values(last_seen_at=now))
        return LoginState(session_id=h, user_id=m["user_id"], username=m["username"], tenant=m["tenant"],
                          roles=tuple(json.loads(m["roles"])), auth_time=float(m["auth_time"]),
                          amr=tuple(json.loads(m["amr"])), acr=m["acr"])

    def login_url(self, return_to: str, *, force: bool = False, acr: str | None = None) -> str:
        params = {"return_to": safe_return_to(return_to) or DEFAULT_RETURN}
        if force:
            params["force"] = "1"
        if acr is not None:
            if acr not in ACR_ORDER:
                raise ValueError(f"unknown acr {acr!r}")
            params["acr"] = acr
        return f"{LOGIN_PATH}?{urlencode(params)}"

    # --- sessions ---
    def create(self, user_id: str, amr: tuple[str, ...], acr: str, req: AsRequest) -> tuple[str, tuple[str, str]]:
        """A new session (deleting the one this browser had); returns (raw id, Set-Cookie)."""
        now = self._clock()
        raw = secrets.token_urlsafe(32)
        with self._db.begin() as conn:
            old = req.cookies.get(self.session_cookie)
            if old:
                conn.execute(tables.sessions.delete().where(tables.sessions.c.id_hash == self._hash(old)))
            conn.execute(tables.sessions.insert().values(
                id_hash=self._hash(raw), user_id=user_id, created_at=now, last_seen_at=now, auth_time=now,
                amr=json.dumps(list(dict.fromkeys(amr))), acr=acr))
        return raw, set_cookie(SESSION, raw, self._cfg.issuer, self._cfg.session_absolute_seconds)

    def destroy(self, req: AsRequest) -> tuple[str, str]:
        """End this browser's session; returns the Set-Cookie that clears it."""
        raw = req.cookies.get(self.session_cookie)
        if raw:
            with self._db.begin() as conn:
                conn.execute(tables.sessions.delete().where(tables.sessions.c.id_hash == self._hash(raw)))
        return clear_cookie(SESSION, self._cfg.issuer)

    def revoke_user_sessions(self, user_id: str) -> int:
        """End every session (and pending login) of a user; returns the sessions ended."""
        with self._db.begin() as conn:
            n = conn.execute(tables.sessions.delete().where(tables.sessions.c.user_id == user_id)).rowcount
            conn.execute(tables.login_flows.delete().where(tables.login_flows.c.user_id == user_id))
        return int(n)

    def purge(self) -> None:
        now = self._clock()
        with self._db.begin() as conn:
            conn.execute(tables.login_flows.delete().where(tables.login_flows.c.expires_at < now))
            conn.execute(tables.sessions.delete().where(
                (tables.sessions.c.last_seen_at < now - self._cfg.session_idle_seconds)
                | (tables.sessions.c.created_at < now - self._cfg.session_absolute_seconds)))
            conn.execute(tables.webauthn_challenges.delete().where(tables.webauthn_challenges.c.expires_at < now))

    # --- flows (pre-sessions) ---
    def new_flow(self, *, return_to: str, want_acr: str | None, force: bool, user_id: str | None = None,
                 amr: tuple[str, ...] = (), stage: str = "start") -> tuple[str, tuple[str, str]]:
        """A new login flow; returns (raw id, Set-Cookie)."""
        now = self._clock()
        raw = secrets.token_urlsafe(32)
        with self._db.begin() as conn:
            conn.execute(tables.login_flows.delete().where(tables.login_flows.c.expires_at < now))
            conn.execute(tables.login_flows.insert().values(
                id_hash=self._hash(raw), created_at=now, expires_at=now + FLOW_SECONDS, return_to=return_to,
                want_acr=want_acr, force=force, user_id=user_id, amr=json.dumps(list(amr)), stage=stage,
                failures=0))
        return raw, set_cookie(FLOW, raw, self._cfg.issuer, FLOW_SECONDS)

    def flow(self, req: AsRequest) -> Flow | None:
        raw = req.cookies.get(self.flow_cookie)
        if not raw or len(raw) > 100:
            return None
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(tables.login_flows).where(
                tables.login_flows.c.id_hash == self._hash(raw))).first()
        if row is None or row._mapping["expires_at"] <= self._clock():
            return None
        m = row._mapping
        return Flow(id_hash=m["id_hash"], return_to=m["return_to"], want_acr=m["want_acr"], force=bool(m["force"]),
                    user_id=m["user_id"], amr=tuple(json.loads(m["amr"])), stage=m["stage"],
                    failures=int(m["failures"]), expires_at=float(m["expires_at"]))

    def advance(self, flow: Flow, *, user_id: str, amr: tuple[str, ...], stage: str) -> tuple[str, tuple[str, str]]:
        """The first factor passed: replace the flow by one bound to the user, under a new
        id (a planted flow cookie is worth nothing); returns (raw id, Set-Cookie)."""
        self.end_flow(flow)
        return self.new_flow(return_to=flow.return_to, want_acr=flow.want_acr, force=flow.force, user_id=user_id,
                             amr=amr, stage=stage)

    def set_stage(self, flow: Flow, stage: str) -> None:
        with self._db.begin() as conn:
            conn.execute(tables.login_flows.update().where(tables.login_flows.c.id_hash == flow.id_hash).values(
                stage=stage))

    def flow_failure(self, flow: Flow) -> int:
        """Count a failed factor; returns the flow's failures now. Read back in the same
        transaction, after the increment locked the row: concurrent wrong codes each see
        their own count, not the stale `flow.failures + 1` every one of them read."""
        lf = tables.login_flows
        with self._db.begin() as conn:
            conn.execute(lf.update().where(lf.c.id_hash == flow.id_hash).values(failures=lf.c.failures + 1))
            n = conn.execute(sa.select(lf.c.failures).where(lf.c.id_hash == flow.id_hash)).scalar()
        return int(n) if n is not None else flow.failures + 1

    def end_flow(self, flow: Flow) -> tuple[str, str]:
        with self._db.begin() as conn:
            conn.execute(tables.login_flows.delete().where(tables.login_flows.c.id_hash == flow.id_hash))
        return clear_cookie(FLOW, self._cfg.issuer)
