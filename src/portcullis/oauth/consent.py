"""Consent for third-party clients, and the page where users see and revoke the apps
they granted.

A third-party client (`Client.first_party` False), or a first-party client of another
tenant, gets a consent page naming each scope in plain words; the answer is
remembered per user + client + scopes (a later request for no more scopes skips the
page; `prompt=consent` shows it again). Forms carry a CSRF token bound to the browser
session: an HMAC under the server pepper over the session id, compared in constant
time (OWASP CSRF cheat sheet, "synchronizer token" without server state).

Pages are server-rendered with every value escaped (`html.escape`), `lang`, headings
and labels, no external assets, served with `html_response`'s strict CSP.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portcullis.oauth import db
from portcullis.oauth.http import FORM, AsRequest, AsResponse, html_response, redirect
from portcullis.oauth.models import Client, LoginState

if TYPE_CHECKING:
    from portcullis.oauth.identity.csrf import Csrf as IdentityCsrf
    from portcullis.oauth.service import AuthContext

#: Scope -> what it lets the app do, in plain words. Unknown scopes are shown by name.
SCOPE_DESCRIPTIONS: dict[str, str] = {
    "openid": "Confirm who you are (your user identifier)",
    "profile": "See your user name",
    "email": "See your e-mail address",
    "offline_access": "Keep access while you are away (until you revoke it)",
    "projects:read": "Read your projects",
    "projects:write": "Create, change and delete your projects",
    "billing:read": "Read your invoices and billing details",
    "users:read": "Read the users of your organisation",
}

consents = sa.Table(
    "oauth_consents", db.metadata,
    sa.Column("user_id", sa.String(200), primary_key=True),
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("scopes", sa.Text, nullable=False),   # JSON list
    sa.Column("granted_at", sa.Float, nullable=False),
)


def describe(scope: str) -> str:
    return SCOPE_DESCRIPTIONS.get(scope, scope)


def consent_required(client: Client, login: LoginState) -> bool:
    """Whether this client needs the user's consent at all (before remembered answers)."""
    return not (client.first_party and client.tenant == login.tenant)


class Csrf:
    """CSRF tokens for the consent and apps forms.

    With the identity pages installed, their `Csrf` (identity/csrf.py: a token bound to
    the session cookie plus an Origin check) is used, so every form of the server follows
    one rule. Without them (unit tests with a stand-in `Sessions`), an HMAC under the
    server pepper over the session id, compared in constant time.
    """

    def __init__(self, ctx: AuthContext) -> None:
        self._ctx = ctx

    def _identity(self) -> IdentityCsrf | None:
        from portcullis.oauth.identity.pages import Identity

        sessions = self._ctx.sessions
        return sessions.csrf if isinstance(sessions, Identity) else None

    def token(self, req: AsRequest, login: LoginState) -> str:
        ident = self._identity()
        if ident is not None:
            return ident.token(req)
        return self._ctx.hasher.digest("csrf:consent:" + login.session_id)

    def check(self, req: AsRequest, login: LoginState) -> bool:
        ident = self._identity()
        if ident is not None:
            return ident.check(req)
        values = req.form.get("csrf_token") or []
        presented = values[0] if len(values) == 1 else ""
        if not presented or len(presented) > 128:
            return False
        expected = self._ctx.hasher.digest("csrf:consent:" + login.session_id)
        return hmac.compare_digest(expected.encode(), presented.encode("ascii", "replace"))


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    client_id: str
    scopes: tuple[str, ...]
    granted_at: float


class Consents:
    """Remembered consent decisions."""

    def __init__(self, adb: db.AuthDb, clock: Callable[[], float]) -> None:
        self._db = adb
        self._clock = clock

    def covers(self, user_id: str, client_id: str, scopes: list[str]) -> bool:
        with self._db.engine.connect() as conn:
            r = conn.execute(sa.select(consents.c.scopes).where(
                (consents.c.user_id == user_id) & (consents.c.client_id == client_id))).first()
        return r is not None and set(scopes) <= set(db.loads_list(r.scopes))

    def grant(self, user_id: str, client_id: str, scopes: list[str]) -> None:
        """Remember consent to `scopes` (added to what was granted before)."""
        try:
            self._grant(user_id, client_id, scopes)
        except IntegrityError:
            # A concurrent first grant inserted the row between our UPDATE and INSERT;
            # now the row exists, so the UPDATE locks it and the scopes are merged.
            self._grant(user_id, client_id, scopes)

    def _grant(self, user_id: str, client_id: str, scopes: list[str]) -> None:
        now = self._clock()
        with self._db.begin() as conn:
            # The UPDATE first: it locks an existing row (PostgreSQL) or takes SQLite's
            # write lock, so the read-merge-write below cannot lose a concurrent grant.
            n = conn.execute(consents.update().where(
                (consents.c.user_id == user_id) & (consents.c.client_id == client_id)).values(granted_at=now)).rowcount
            r = conn.execute(sa.select(consents.c.scopes).where(
                (consents.c.user_id == user_id) & (consents.c.client_id == client_id))).first()
            merged = sorted(set(scopes) | set(db.loads_list(r.scopes) if r else []))
            if n:
                conn.execute(consents.update().where(
                    (consents.c.user_id == user_id) & (consents.c.client_id == client_id)).values(
                    scopes=db.dumps(merged)))
            else:
                conn.execute(consents.insert().values(user_id=user_id, client_id=client_id, scopes=db.dumps(merged),
                                                      granted_at=now))

    def forget(self, user_id: str, client_id: str | None = None) -> int:
        cond = consents.c.user_id == user_id
        if client_id is not None:
            cond &= consents.c.client_id == client_id
        with self._db.begin() as conn:
            return int(conn.execute(consents.delete().where(cond)).rowcount)

    def of_user(self, user_id: str) -> list[ConsentRecord]:
        with self._db.engine.connect() as conn:
            rows = conn.execute(sa.select(consents).where(consents.c.user_id == user_id)).all()
        return [ConsentRecord(r.client_id, tuple(db.loads_list(r.scopes)), float(r.granted_at)) for r in rows]


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;line-height:1.5}"
          "button{font-size:1rem;padding:.5rem 1rem;margin-right:.5rem}ul{padding-left:1.25rem}"
          ".muted{color:#555}")


def page(title: str, body: str, *, status: int = 200, reason: str = "ok") -> AsResponse:
    """A complete, accessible page; `title` is escaped here, `body` must already be."""
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><main>{body}</main></body></html>")
    return html_response(html, status, reason=reason)


def error_page(title: str, message: str, *, status: int = 400, reason: str) -> AsResponse:
    """An error shown to the user, never redirected to an unverified client (RFC 6749 §4.1.2.1)."""
    return page(title, f"<h1>{escape(title)}</h1><p>{escape(message)}</p>", status=status, reason=reason)


def consent_page(*, client: Client, login: LoginState, scopes: list[str], request_uri: str, csrf: str) -> AsResponse:
    items = "".join(
        f"<li>{escape(describe(s))}" + (f' <span class="muted">({escape(s)})</span>' if s in SCOPE_DESCRIPTIONS
                                         else "") + "</li>" for s in scopes)
    if not items:
        items = "<li>Know that you use it (no access to your data)</li>"
    body = (f"<h1>Allow {escape(client.name)} to access your account?</h1>"
            f"<p>You are signed in as <strong>{escape(login.username)}</strong> ({escape(login.tenant)}).</p>"
            f'<h2 id="scopes-heading">{escape(client.name)} asks to:</h2>'
            f'<ul aria-labelledby="scopes-heading">{items}</ul>'
            f'<form method="post" action="/oauth2/consent">'
            f'<input type="hidden" name="csrf_token" value="{escape(csrf)}">'
            f'<input type="hidden" name="client_id" value="{escape(client.client_id)}">'
            f'<input type="hidden" name="request_uri" value="{escape(request_uri)}">'
            f'<button type="submit" name="decision" value="allow">Allow</button>'
            f'<button type="submit" name="decision" value="deny">Deny</button>'
            f"</form>"
            f'<p class="muted">You can revoke this later on <a href="/account/apps">your apps page</a>.</p>')
    return page(f"Allow {client.name}?", body, reason="oauth.consent_shown")


#: Revokes a user's grants to a client (refresh families, access tokens); returns a count.
GrantRevoker = Callable[[str, str | None], int]


class AppsPage:
    """GET /account/apps lists the apps the user granted; POST revokes one."""

    def __init__(self, ctx: AuthContext, consents_store: Consents, csrf: Csrf, user_grants: Callable[[str], list[str]],
                 revoke: GrantRevoker) -> None:
        self._ctx = ctx
        self._consents = consents_store
        self._csrf = csrf
        self._user_grants = user_grants
        self._revoke = revoke

    async def get(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._get, req)

    async def post(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._post, req)

    def _login(self, req: AsRequest) -> LoginState | AsResponse:
        sessions = self._ctx.require_sessions()
        login = sessions.current(req)
        if login is None:
            return redirect(sessions.login_url("/account/apps"), reason="account.login_required")
        req.audit["user_id"] = login.user_id
        return login

    def _get(self, req: AsRequest, notice: str | None = None) -> AsResponse:
        login = self._login(req)
        if isinstance(login, AsResponse):
            return login
        scopes: dict[str, set[str]] = {}
        since: dict[str, float] = {}
        for c in self._consents.of_user(login.user_id):
            scopes.setdefault(c.client_id, set()).update(c.scopes)
            since[c.client_id] = c.granted_at
        for cid in self._user_grants(login.user_id):
            scopes.setdefault(cid, set())
        rows = []
        csrf = escape(self._csrf.token(req, login))
        for cid in sorted(scopes, key=lambda c: self._name(c).lower()):
            name = self._name(cid)
            listed = "".join(f"<li>{escape(describe(s))}</li>" for s in sorted(scopes[cid])) or "<li>No scopes</li>"
            when = (f'<p class="muted">Granted {escape(datetime.fromtimestamp(since[cid], UTC).strftime("%Y-%m-%d"))}'
                    "</p>" if cid in since else "")
            rows.append(
                f'<section aria-labelledby="app-{escape(quote(cid))}"><h2 id="app-{escape(quote(cid))}">'
                f"{escape(name)}</h2>{when}<ul>{listed}</ul>"
                f'<form method="post" action="/account/apps">'
                f'<input type="hidden" name="csrf_token" value="{csrf}">'
                f'<input type="hidden" name="client_id" value="{escape(cid)}">'
                f'<button type="submit" aria-label="Revoke access for {escape(name)}">Revoke access</button>'
                f"</form></section>")
        lead = f'<p role="status">{escape(notice)}</p>' if notice else ""
        content = "".join(rows) or "<p>You have not granted any apps access to your account.</p>"
        return page("Your apps", f"<h1>Apps with access to your account</h1>{lead}{content}", reason="account.apps")

    def _name(self, client_id: str) -> str:
        c = self._ctx.clients.get(client_id)
        return c.name if c is not None else client_id

    def _post(self, req: AsRequest) -> AsResponse:
        login = self._login(req)
        if isinstance(login, AsResponse):
            return login
        if req.content_type != FORM or not self._csrf.check(req, login):
            return error_page("Request refused", "The form has expired. Reload the page and try again.",
                              status=403, reason="account.csrf")
        client_id = req.param("client_id") or ""
        if not client_id or len(client_id) > 64:
            return error_page("Request refused", "No app was named.", reason="account.bad_request")
        name = self._name(client_id)
        self._consents.forget(login.user_id, client_id)
        n = self._revoke(login.user_id, client_id)
        req.audit.update(client_id=client_id, revoked_families=n)
        resp = self._get(req, notice=f"Access for {name} was revoked.")
        resp.reason = "account.app_revoked"
        return resp
