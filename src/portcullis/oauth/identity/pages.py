"""The identity pages and JSON endpoints, and `Identity`, which ties the area together
and implements the `Sessions` protocol for the authorization endpoint.

Login, step by step:

1. `GET /account/login?return_to=/path[&acr=...][&force=1]` — with a live session that is
   strong enough (and no `force`), straight back to `return_to`; with a weaker one, a
   step-up flow that asks only for the missing factor; otherwise the password form.
2. `POST /account/login` — throttle check (no password check while throttled), one
   argon2 verification whatever the username, same page and status for every failure.
3. Second factor when needed (`/account/login/mfa`): TOTP or a recovery code, or a
   passkey; a tenant whose policy is `phishing_resistant` accepts passkeys only. A user
   without a usable factor enrols one first (`/account/login/enroll`).
4. A new session (new id), then a 303 to `return_to` (a path on this origin only).

A passkey alone (user verification required) is a complete login at
`ACR_PHISHING_RESISTANT`; it is not blocked by the password lock (see throttle.py).
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape

from portcullis.credentials.acr import ACR_MFA, ACR_ORDER, ACR_PASSWORD, ACR_PHISHING_RESISTANT, acr_satisfies
from portcullis.oauth.http import AsRequest, AsResponse, AsRoutes, Handler, html_response, json_response, redirect
from portcullis.oauth.identity import totp
from portcullis.oauth.identity.csrf import Csrf
from portcullis.oauth.identity.keys import IdentityKeys
from portcullis.oauth.identity.passkeys import PasskeyError, Passkeys
from portcullis.oauth.identity.passwords import PasswordHasher
from portcullis.oauth.identity.sessions import DEFAULT_RETURN, Flow, SessionStore, safe_return_to
from portcullis.oauth.identity.throttle import LoginThrottle
from portcullis.oauth.identity.users import User, Users
from portcullis.oauth.models import LoginState

if TYPE_CHECKING:
    from portcullis.oauth.service import AuthContext

#: The account pages need an authentication at most this old (seconds).
FRESH_SECONDS = 600
#: Wrong second-factor codes in one login flow before it must start again.
MAX_FLOW_FAILURES = 5
MAX_JSON_BYTES = 32 * 1024
AMR_PASSKEY = ("hwk", "user", "mfa")
STATIC = {"/account/static/passkey.js": ("passkey.js", "text/javascript; charset=utf-8"),
          "/account/static/account.css": ("account.css", "text/css; charset=utf-8")}
LOGIN_FAILED = "The username or password is incorrect."
POLICY_FLOOR = {"optional": ACR_PASSWORD, "required": ACR_MFA, "phishing_resistant": ACR_PHISHING_RESISTANT}


def strongest(*acrs: str) -> str:
    return max(acrs, key=ACR_ORDER.index)


def _json_error(reason: str, message: str, status: int = 400) -> AsResponse:
    return json_response({"error": reason.split(".", 1)[-1], "message": message}, status, reason=reason)


class Identity:
    """Users, sessions, throttling, passkeys and the pages; `ctx.sessions` is this object."""

    def __init__(self, ctx: AuthContext, *, hasher: PasswordHasher | None = None) -> None:
        self.ctx = ctx
        cfg = ctx.cfg

        def clock() -> float:
            return ctx.clock()

        self.keys = IdentityKeys.load(ctx.secrets_dir)
        self.users = Users(ctx, hasher=hasher, keys=self.keys)
        self.store = SessionStore(ctx.db, cfg, self.keys.session, clock)
        self.throttle = LoginThrottle(ctx.db, cfg.login_throttle, self.keys.throttle, clock)
        self.passkeys = Passkeys(ctx.db, cfg.issuer, self.keys.session, clock)
        self.csrf = Csrf(self.keys.csrf, cfg.issuer)
        self._env = Environment(loader=PackageLoader("portcullis.oauth.identity", "templates"),
                                autoescape=select_autoescape(default=True, default_for_string=True))
        base = resources.files("portcullis.oauth.identity").joinpath("static")
        self._static = {path: (base.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}

    # --- Sessions protocol ---
    def current(self, req: AsRequest) -> LoginState | None:
        return self.store.current(req)

    def login_url(self, return_to: str, *, force: bool = False, acr: str | None = None) -> str:
        return self.store.login_url(return_to, force=force, acr=acr)

    def revoke_user_sessions(self, user_id: str) -> int:
        return self.store.revoke_user_sessions(user_id)

    # --- routes ---
    def register(self, routes: AsRoutes) -> None:
        routes.add("GET", "/account/login", self.login_page)
        routes.add("POST", "/account/login", self._form(self.login_submit))
        routes.add("GET", "/account/login/mfa", self.mfa_page)
        routes.add("POST", "/account/login/mfa", self._form(self.mfa_submit))
        routes.add("GET", "/account/login/enroll", self.enroll_page)
        routes.add("POST", "/account/login/enroll", self._form(self.enroll_submit))
        routes.add("POST", "/account/passkey/login/options", self._json(self.passkey_login_options))
        routes.add("POST", "/account/passkey/login/verify", self._json(self.passkey_login_verify))
        routes.add("POST", "/account/passkey/register/options", self._json(self.passkey_register_options))
        routes.add("POST", "/account/passkey/register/verify", self._json(self.passkey_register_verify))
        routes.add("POST", "/account/logout", self._form(self.logout))
        routes.add("GET", "/account/security", self.security_page)
        routes.add("GET", "/account/security/totp", self.security_totp_page)
        routes.add("POST", "/account/security/totp", self._form(self.security_totp_submit))
        routes.add("POST", "/account/security/recovery-codes", self._form(self.security_recovery_codes))
        routes.add("POST", "/account/security/passkeys/delete", self._form(self.security_passkey_delete))
        for path in self._static:
            routes.add("GET", path, self.static)

    # --- rendering ---
    def _render(self, template: str, status: int = 200, headers: list[tuple[str, str]] | None = None, *,
                reason: str = "ok", **params: Any) -> AsResponse:
        html = self._env.get_template(template).render(**params)
        resp = html_response(html, status, headers, reason=reason)
        # Same-origin form posts must carry a real Origin (a "no-referrer" document sends
        # `Origin: null`, Fetch §3.1); other origins still learn nothing (RFC: same-origin).
        resp.headers = [(k, "same-origin" if k == "referrer-policy" else v) for k, v in resp.headers]
        return resp

    def _message(self, title: str, text: str, status: int, *, reason: str, link: str | None = None,
                 link_text: str = "", headers: list[tuple[str, str]] | None = None) -> AsResponse:
        return self._render("message.html", status, headers, reason=reason, title=title, text=text, link=link,
                            link_text=link_text)

    def _form(self, handler: Handler) -> Handler:
        """`handler` behind the CSRF check every form POST needs (a refusal is a page)."""
        async def checked(req: AsRequest) -> AsResponse:
            bad = self.csrf.failure(req)
            return self._csrf_refused(req, bad) if bad else await handler(req)
        return checked

    def _json(self, handler: Handler) -> Handler:
        """`handler` behind the same CSRF check for the passkey JSON endpoints."""
        async def checked(req: AsRequest) -> AsResponse:
            bad = self.csrf.failure(req)
            return _json_error(bad, "Reload the page and try again.", 403) if bad else await handler(req)
        return checked

    def _csrf_refused(self, req: AsRequest, reason: str) -> AsResponse:
        req.audit["csrf"] = reason
        return self._message("This form cannot be accepted",
                             "The form expired or was sent from another site. Reload the page and try again.",
                             403, reason=reason, link="/account/login", link_text="Sign in again")

    async def static(self, req: AsRequest) -> AsResponse:
        body, ctype = self._static[req.path]
        return AsResponse(200, body, [("content-type", ctype), ("cache-control", "no-cache"),
                                      ("x-content-type-options", "nosniff")])

    # --- policy ---
    def required_acr(self, user: User, want: str | None) -> str | None:
        """The context class this login must reach: the request's, the tenant policy's
        floor, and at least MFA for a user who enrolled a second factor. None when the
        user's tenant no longer exists (no login)."""
        policy = self.ctx.clients.tenant_policy(user.tenant)
        if policy is None:
            return None
        need = strongest(want if want in ACR_ORDER else ACR_PASSWORD, POLICY_FLOOR.get(policy, ACR_MFA))
        if user.has_totp or self.users.passkey_count(user.user_id):
            need = strongest(need, ACR_MFA)
        return need

    def _next_stage(self, user: User, need: str) -> str:
        """"mfa" when the user has a factor that can reach `need`, else "enroll"."""
        if self.users.passkey_count(user.user_id):
            return "mfa"
        if need == ACR_PHISHING_RESISTANT:
            return "enroll"
        return "mfa" if user.has_totp or self.users.recovery_codes_left(user.user_id) else "enroll"

    def _finish(self, req: AsRequest, flow: Flow | None, user: User, amr: tuple[str, ...], acr: str,
                *, as_json: bool = False) -> AsResponse:
        """Create the session (new id), end the flow, reset the account's counter."""
        _raw, cookie = self.store.create(user.user_id, amr, acr, req)
        headers = [cookie]
        if flow is not None:
            headers.append(self.store.end_flow(flow))
        self.throttle.success(self.throttle.account_key(user.username))
        req.audit.update(user_id=user.user_id, tenant=user.tenant, acr=acr, amr=list(amr))
        target = flow.return_to if flow is not None else DEFAULT_RETURN
        if as_json:
            return json_response({"redirect": target}, 200, headers, reason="login.ok")
        return redirect(target, headers, reason="login.ok")

    def _audit_user(self, req: AsRequest, user: User) -> None:
        req.audit.update(username=user.username, user_id=user.user_id, tenant=user.tenant)

    # --- login ---
    async def login_page(self, req: AsRequest) -> AsResponse:
        return_to = safe_return_to(req.param("return_to", "query")) or DEFAULT_RETURN
        if req.param("return_to", "query") and return_to != req.param("return_to", "query"):
            req.audit["return_to_refused"] = True
        acr = req.param("acr", "query")
        want = acr if acr in ACR_ORDER else None
        force = req.param("force", "query") == "1"
        session = self.store.current(req)
        if session is not None and not force:
            user = self.users.get(session.user_id)
            need = self.required_acr(user, want) if user else None
            if user is not None and need is not None:
                if acr_satisfies(session.acr, need):
                    return redirect(return_to, reason="login.session")
                # Step-up: the user proves only the missing factor.
                self._audit_user(req, user)
                stage = self._next_stage(user, need)
                _raw, cookie = self.store.new_flow(return_to=return_to, want_acr=want, force=False,
                                                   user_id=user.user_id, amr=session.amr, stage=stage)
                return redirect(f"/account/login/{stage}", [cookie], reason="login.step_up")
        raw, cookie = self.store.new_flow(return_to=return_to, want_acr=want, force=force)
        return self._render("login.html", 200, [cookie], title="Sign in", csrf=self.csrf.token_for(raw),
                            passkey_js=True, username="")

    async def login_submit(self, req: AsRequest) -> AsResponse:
        flow = self.store.flow(req)
        if flow is None:
            return self._message("Sign in", "The sign-in form expired. Please start again.", 400,
                                 reason="login.no_flow", link="/account/login", link_text="Sign in")
        username = (req.param("username") or "").strip()
        password = req.param("password") or ""
        req.audit["username"] = username[:254]
        csrf = self.csrf.token(req)
        account = self.throttle.account_key(username)
        ip = self.throttle.ip_key(req.client_ip)
        verdict = self.throttle.check(account, ip)
        if not verdict.allowed:
            return self._render("login.html", 429, [("retry-after", str(verdict.retry_after))],
                                reason=verdict.reason, title="Sign in", csrf=csrf, passkey_js=True,
                                username=username,
                                error=f"Too many attempts. Try again in {verdict.retry_after} seconds.")
        # argon2 runs in a worker thread: it must not stall the event loop.
        user, why = await asyncio.to_thread(self.users.authenticate, username, password)
        if user is not None:
            need = self.required_acr(user, flow.want_acr)
            if need is None:
                user, why = None, "login.no_tenant"
        if user is None or need is None:
            self.throttle.failure(account, ip)
            return self._render("login.html", 401, reason=why, title="Sign in", csrf=csrf, passkey_js=True,
                                username=username, error=LOGIN_FAILED)
        self._audit_user(req, user)
        if acr_satisfies(ACR_PASSWORD, need):
            return self._finish(req, flow, user, ("pwd",), ACR_PASSWORD)
        stage = self._next_stage(user, need)
        _raw, cookie = self.store.advance(flow, user_id=user.user_id, amr=("pwd",), stage=stage)
        return redirect(f"/account/login/{stage}", [cookie], reason="login.password_ok")

    def _flow_user(self, req: AsRequest, stage: str) -> tuple[Flow, User, str] | AsResponse:
        flow = self.store.flow(req)
        user = self.users.get(flow.user_id) if flow is not None and flow.user_id else None
        need = self.required_acr(user, flow.want_acr) if flow is not None and user is not None else None
        if flow is None or user is None or need is None or not user.active or flow.stage != stage:
            target = self.store.login_url(flow.return_to) if flow is not None else "/account/login"
            return redirect(target, reason="login.no_flow")
        self._audit_user(req, user)
        return flow, user, need

    async def mfa_page(self, req: AsRequest) -> AsResponse:
        got = self._flow_user(req, "mfa")
        if isinstance(got, AsResponse):
            return got
        _flow, user, need = got
        return self._mfa_render(req, user, need)

    def _mfa_render(self, req: AsRequest, user: User, need: str, status: int = 200, *, error: str | None = None,
                    reason: str = "ok") -> AsResponse:
        codes = need != ACR_PHISHING_RESISTANT and (user.has_totp or self.users.recovery_codes_left(user.user_id) > 0)
        return self._render("mfa.html", status, reason=reason, title="Two-step verification",
                            csrf=self.csrf.token(req), passkey_js=True, username=user.username, allow_codes=codes,
                            has_passkey=self.users.passkey_count(user.user_id) > 0, error=error)

    async def mfa_submit(self, req: AsRequest) -> AsResponse:
        got = self._flow_user(req, "mfa")
        if isinstance(got, AsResponse):
            return got
        flow, user, need = got
        if need == ACR_PHISHING_RESISTANT:
            return self._mfa_render(req, user, need, 403, reason="login.factor_not_allowed",
                                    error="Your organisation requires a passkey to sign in.")
        account = self.throttle.account_key(user.username)
        ip = self.throttle.ip_key(req.client_ip)
        verdict = self.throttle.check(account, ip)
        if not verdict.allowed:
            resp = self._mfa_render(req, user, need, 429, reason=verdict.reason,
                                    error=f"Too many attempts. Try again in {verdict.retry_after} seconds.")
            resp.headers.append(("retry-after", str(verdict.retry_after)))
            return resp
        code = (req.param("code") or "").strip().replace(" ", "")
        if code.isdigit() and len(code) == totp.DIGITS:
            result = self.users.verify_totp(user.user_id, code)
            if result == "ok":
                return self._finish(req, flow, user, (*flow.amr, "otp", "mfa"), ACR_MFA)
            why = "login.totp_replay" if result == "replay" else "login.bad_totp"
        elif self.users.use_recovery_code(user.user_id, code):
            req.audit["recovery_codes_left"] = self.users.recovery_codes_left(user.user_id)
            return self._finish(req, flow, user, (*flow.amr, "otp", "mfa"), ACR_MFA)
        else:
            why = "login.bad_recovery_code"
        self.throttle.failure(account, ip)
        if self.store.flow_failure(flow) >= MAX_FLOW_FAILURES:
            cookie = self.store.end_flow(flow)
            req.audit["flow_ended"] = True
            return self._message("Two-step verification", "Too many wrong codes. Please sign in again.", 401,
                                 reason=why, link=self.store.login_url(flow.return_to), link_text="Sign in",
                                 headers=[cookie])
        return self._mfa_render(req, user, need, 401, reason=why, error="That code is not valid. Try again.")

    # --- enrolment during login (the tenant or the request needs a factor the user lacks) ---
    async def enroll_page(self, req: AsRequest) -> AsResponse:
        got = self._flow_user(req, "enroll")
        if isinstance(got, AsResponse):
            return got
        _flow, user, need = got
        secret = self.users.begin_totp(user.user_id) if need != ACR_PHISHING_RESISTANT else None
        return self._enroll(req, user, secret, action="/account/login/enroll", intro=self._enroll_intro(need))

    def _enroll(self, req: AsRequest, user: User, secret: str | None, *, action: str, status: int = 200,
                error: str | None = None, reason: str = "ok", intro: str | None = None,
                allow_passkey: bool = True, title: str = "Set up two-step verification") -> AsResponse:
        grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4)) if secret else ""
        uri = totp.provisioning_uri(secret, user.username, "Portcullis") if secret else ""
        return self._render("enroll.html", status, reason=reason, title=title, csrf=self.csrf.token(req),
                            passkey_js=allow_passkey, intro=intro, error=error, secret=secret,
                            secret_grouped=grouped, uri=uri, action=action, allow_passkey=allow_passkey)

    @staticmethod
    def _enroll_intro(need: str) -> str:
        if need == ACR_PHISHING_RESISTANT:
            return "Your organisation requires a passkey. Create one to finish signing in."
        return "Your account needs a second factor. Set up an authenticator app or a passkey to finish signing in."

    async def enroll_submit(self, req: AsRequest) -> AsResponse:
        got = self._flow_user(req, "enroll")
        if isinstance(got, AsResponse):
            return got
        flow, user, need = got
        if need == ACR_PHISHING_RESISTANT:
            return self._enroll(req, user, None, action="/account/login/enroll", status=403,
                                reason="login.factor_not_allowed", intro=self._enroll_intro(need),
                                error="Your organisation requires a passkey.")
        if not self.users.confirm_totp(user.user_id, req.param("code") or ""):
            if self.store.flow_failure(flow) >= MAX_FLOW_FAILURES:
                cookie = self.store.end_flow(flow)
                return self._message("Set up two-step verification", "Too many wrong codes. Please sign in again.",
                                     401, reason="enroll.bad_totp", link=self.store.login_url(flow.return_to),
                                     link_text="Sign in", headers=[cookie])
            return self._enroll(req, user, self.users.pending_totp(user.user_id), action="/account/login/enroll",
                                status=400, reason="enroll.bad_totp", intro=self._enroll_intro(need),
                                error="That code is not valid. Check the app's clock and try again.")
        codes = self.users.new_recovery_codes(user.user_id)
        done = self._finish(req, flow, user, (*flow.amr, "otp", "mfa"), ACR_MFA)
        cookies = [h for h in done.headers if h[0] == "set-cookie"]
        return self._render("codes.html", 200, cookies, reason="login.ok", title="Your recovery codes",
                            codes=codes, next=flow.return_to)

    # --- passkeys (JSON) ---
    def _json_body(self, req: AsRequest) -> dict[str, Any] | None:
        if req.content_type != "application/json" or len(req.body) > MAX_JSON_BYTES:
            return None
        try:
            doc = json.loads(req.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    async def passkey_login_options(self, req: AsRequest) -> AsResponse:
        flow = self.store.flow(req)
        if flow is None or flow.stage not in ("start", "mfa"):
            return _json_error("login.no_flow", "The sign-in page expired. Reload it and try again.")
        return AsResponse(200, self.passkeys.authentication_options(flow.id_hash, flow.user_id).encode(),
                          [("content-type", "application/json")], reason="passkey.options")

    async def passkey_login_verify(self, req: AsRequest) -> AsResponse:
        flow = self.store.flow(req)
        doc = self._json_body(req)
        if flow is None or flow.stage not in ("start", "mfa"):
            return _json_error("login.no_flow", "The sign-in page expired. Reload it and try again.")
        cred = doc.get("credential") if doc else None
        if not isinstance(cred, dict):
            return _json_error("login.bad_passkey", "The passkey could not be verified.")
        ip = self.throttle.ip_key(req.client_ip)
        verdict = self.throttle.check(None, ip)
        if not verdict.allowed:
            return _json_error(verdict.reason, f"Too many attempts. Try again in {verdict.retry_after} seconds.", 429)
        try:
            user_id = self.passkeys.authenticate(flow.id_hash, cred)
        except PasskeyError as exc:
            self.throttle.failure(None, ip)
            return _json_error(exc.reason, str(exc), 401)
        user = self.users.get(user_id)
        need = self.required_acr(user, flow.want_acr) if user is not None else None
        if user is None or need is None or not user.active:
            self.throttle.failure(None, ip)
            return _json_error("login.disabled", "The passkey could not be verified.", 401)
        self._audit_user(req, user)
        return self._finish(req, flow, user, (*flow.amr, *AMR_PASSKEY), ACR_PHISHING_RESISTANT, as_json=True)

    def _registrant(self, req: AsRequest) -> tuple[str, User, Flow | None] | AsResponse:
        """Who may register a passkey now: a fresh session's user, or a login flow at its
        enrolment stage. Returns (challenge binding, user, flow) or a JSON refusal."""
        session = self.store.current(req)
        if session is not None and self.ctx.clock() - session.auth_time <= FRESH_SECONDS:
            user = self.users.get(session.user_id)
            if user is not None:
                self._audit_user(req, user)
                return session.session_id, user, None
        flow = self.store.flow(req)
        if flow is not None and flow.stage == "enroll" and flow.user_id:
            user = self.users.get(flow.user_id)
            if user is not None and user.active:
                self._audit_user(req, user)
                return flow.id_hash, user, flow
        return _json_error("passkey.not_fresh", "Sign in again to add a passkey.", 403)

    async def passkey_register_options(self, req: AsRequest) -> AsResponse:
        got = self._registrant(req)
        if isinstance(got, AsResponse):
            return got
        binding, user, _flow = got
        try:
            options = self.passkeys.registration_options(binding, user.user_id, user.username)
        except PasskeyError as exc:
            return _json_error(exc.reason, str(exc))
        return AsResponse(200, options.encode(), [("content-type", "application/json")], reason="passkey.options")

    async def passkey_register_verify(self, req: AsRequest) -> AsResponse:
        got = self._registrant(req)
        if isinstance(got, AsResponse):
            return got
        binding, user, flow = got
        doc = self._json_body(req)
        cred = doc.get("credential") if doc else None
        name = doc.get("name") if doc else None
        if not isinstance(cred, dict):
            return _json_error("passkey.bad_registration", "The passkey could not be registered.")
        try:
            key = self.passkeys.register(binding, user.user_id, cred, name if isinstance(name, str) else "Passkey")
        except PasskeyError as exc:
            return _json_error(exc.reason, str(exc))
        req.audit["credential_id"] = key.credential_id[:32]
        if flow is not None:
            # Enrolled during login: now sign in with it (a real assertion, user verified).
            self.store.set_stage(flow, "mfa")
            return json_response({"redirect": "/account/login/mfa"}, reason="passkey.registered")
        return json_response({"redirect": "/account/security"}, reason="passkey.registered")

    # --- logout ---
    async def logout(self, req: AsRequest) -> AsResponse:
        session = self.store.current(req)
        if session is not None:
            req.audit.update(user_id=session.user_id, username=session.username)
        headers = [self.store.destroy(req)]
        flow = self.store.flow(req)
        if flow is not None:
            headers.append(self.store.end_flow(flow))
        return redirect("/account/login", headers, reason="logout")

    # --- account security (needs a fresh session) ---
    def _fresh(self, req: AsRequest, path: str) -> tuple[LoginState, User] | AsResponse:
        session = self.store.current(req)
        if session is None:
            return redirect(self.store.login_url(path), reason="account.no_session")
        if self.ctx.clock() - session.auth_time > FRESH_SECONDS:
            return redirect(self.store.login_url(path, force=True), reason="account.not_fresh")
        user = self.users.get(session.user_id)
        if user is None:
            return redirect(self.store.login_url(path), reason="account.no_session")
        self._audit_user(req, user)
        return session, user

    async def security_page(self, req: AsRequest) -> AsResponse:
        got = self._fresh(req, "/account/security")
        if isinstance(got, AsResponse):
            return got
        _session, user = got
        notice = {"totp": "The authenticator app is on.", "passkey": "The passkey was removed."}.get(
            req.param("done", "query") or "")
        return self._render("security.html", title="Account security", csrf=self.csrf.token(req), passkey_js=True,
                            user=user, passkeys=self.passkeys.for_user(user.user_id), notice=notice,
                            codes_left=self.users.recovery_codes_left(user.user_id))

    async def security_totp_page(self, req: AsRequest) -> AsResponse:
        got = self._fresh(req, "/account/security/totp")
        if isinstance(got, AsResponse):
            return got
        _session, user = got
        return self._enroll(req, user, self.users.begin_totp(user.user_id), action="/account/security/totp",
                            allow_passkey=False, title="Set up an authenticator app")

    async def security_totp_submit(self, req: AsRequest) -> AsResponse:
        got = self._fresh(req, "/account/security/totp")
        if isinstance(got, AsResponse):
            return got
        _session, user = got
        if not self.users.confirm_totp(user.user_id, req.param("code") or ""):
            return self._enroll(req, user, self.users.pending_totp(user.user_id), action="/account/security/totp",
                                status=400, reason="enroll.bad_totp", allow_passkey=False,
                                title="Set up an authenticator app", error="That code is not valid. Try again.")
        if self.users.recovery_codes_left(user.user_id) == 0:
            codes = self.users.new_recovery_codes(user.user_id)
            return self._render("codes.html", reason="enroll.totp", title="Your recovery codes", codes=codes,
                                next="/account/security?done=totp")
        return redirect("/account/security?done=totp", reason="enroll.totp")

    async def security_recovery_codes(self, req: AsRequest) -> AsResponse:
        got = self._fresh(req, "/account/security")
        if isinstance(got, AsResponse):
            return got
        _session, user = got
        codes = self.users.new_recovery_codes(user.user_id)
        return self._render("codes.html", reason="recovery.regenerated", title="Your recovery codes", codes=codes,
                            next="/account/security")

    async def security_passkey_delete(self, req: AsRequest) -> AsResponse:
        got = self._fresh(req, "/account/security")
        if isinstance(got, AsResponse):
            return got
        _session, user = got
        cid = req.param("credential_id") or ""
        if (self.ctx.clients.tenant_policy(user.tenant) == "phishing_resistant"
                and self.users.passkey_count(user.user_id) <= 1):
            return self._message("Passkeys", "Your organisation requires a passkey: add another before removing "
                                 "this one.", 409, reason="passkey.last_one", link="/account/security",
                                 link_text="Back")
        if not self.passkeys.delete(user.user_id, cid):
            return self._message("Passkeys", "No such passkey.", 404, reason="passkey.unknown",
                                 link="/account/security", link_text="Back")
        return redirect("/account/security?" + urlencode({"done": "passkey"}), reason="passkey.deleted")
