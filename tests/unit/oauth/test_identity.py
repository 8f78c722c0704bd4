"""The identity side in-process: users and passwords, login pages, MFA, throttling,
sessions, CSRF and redirects, driven through the registered handlers with a fake clock."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pyotp
import pytest
import sqlalchemy as sa

from portcullis.credentials.acr import ACR_MFA, ACR_PASSWORD, ACR_PHISHING_RESISTANT
from portcullis.credentials.apikeys import KeyHasher
from portcullis.oauth.config import AuthServerConfig, LoginThrottleConfig
from portcullis.oauth.http import AsRequest, AsResponse
from portcullis.oauth.identity import identity_of, install, tables
from portcullis.oauth.identity.csrf import Csrf, check_csrf, csrf_token
from portcullis.oauth.identity.pages import Identity
from portcullis.oauth.identity.passwords import PasswordHasher, PasswordPolicy, WeakPasswordError
from portcullis.oauth.identity.sessions import safe_return_to
from portcullis.oauth.identity.throttle import LoginThrottle, ip_key
from portcullis.oauth.identity.users import UserExistsError, Users
from portcullis.oauth.service import AuthContext, open_context
from tests.support import MemoryKeyStore

ISSUER = "http://127.0.0.1:9999"
PASSWORD = "correct horse battery staple 42"
T0 = 1_700_000_010.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@dataclass
class Env:
    ctx: AuthContext
    ident: Identity
    clock: Clock

    @property
    def users(self) -> Users:
        return self.ident.users

    def browser(self, ip: str = "198.51.100.7") -> Browser:
        return Browser(self, ip)

    def user(self, username: str, tenant: str = "acme", *, totp: bool = False) -> tuple[str, str | None]:
        u = self.users.create(tenant, username, PASSWORD, ["member"])
        return u.user_id, (self.users.enroll_totp(u.user_id) if totp else None)


@dataclass
class Browser:
    env: Env
    ip: str
    cookies: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, form: dict[str, str] | None = None, *,
                   json_body: Any = None, headers: dict[str, str] | None = None,
                   origin: str | None = ISSUER) -> AsResponse:
        parts = urlsplit(path)
        hdrs = {"host": "127.0.0.1:9999", **({"origin": origin} if origin and method == "POST" else {}),
                **(headers or {})}
        body = b""
        if form is not None:
            body = urlencode(form).encode()
            hdrs["content-type"] = "application/x-www-form-urlencoded"
        elif json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["content-type"] = "application/json"
        req = AsRequest(method=method, path=parts.path, query=parse_qs(parts.query), headers=hdrs, body=body,
                        client_ip=self.ip, scheme="http", host="127.0.0.1:9999", issuer=ISSUER,
                        request_id="r", cookies=dict(self.cookies))
        methods = self.env.ctx.routes.lookup(parts.path)
        assert methods is not None, path
        resp = await methods[method](req)
        resp.headers.append(("x-test-audit", json.dumps(req.audit)))
        for k, v in resp.headers:
            if k == "set-cookie":
                name, _, rest = v.partition("=")
                value = rest.split(";", 1)[0]
                if "Max-Age=0" in v:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
        return resp

    async def form_token(self, path: str) -> str:
        r = await self.call("GET", path)
        assert r.status == 200, (path, r.status, r.body[:300])
        return token_in(r)

    async def login(self, username: str, password: str = PASSWORD, return_to: str = "/next") -> AsResponse:
        token = await self.form_token("/account/login?" + urlencode({"return_to": return_to}))
        return await self.call("POST", "/account/login",
                               {"username": username, "password": password, "csrf_token": token})

    async def mfa(self, code: str) -> AsResponse:
        token = await self.form_token("/account/login/mfa")
        return await self.call("POST", "/account/login/mfa", {"code": code, "csrf_token": token})


def token_in(resp: AsResponse) -> str:
    m = re.search(rb'name="csrf[-_]token" (?:value|content)="([^"]+)"', resp.body)
    assert m, resp.body[:500]
    return m.group(1).decode()


def location(resp: AsResponse) -> str:
    return dict(resp.headers)["location"]


def audit(resp: AsResponse) -> dict[str, Any]:
    return dict(json.loads(dict(resp.headers)["x-test-audit"]))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    clock = Clock(T0)
    cfg = AuthServerConfig(issuer=ISSUER, login_throttle=LoginThrottleConfig(
        free_failures_per_account=3, max_delay_seconds=30, lock_after_failures=6, lock_seconds=300,
        free_failures_per_ip=10, ip_window_seconds=600))
    ctx = open_context(cfg, tmp_path, KeyHasher(b"p" * 32), MemoryKeyStore(), clock=clock)
    ctx.clients.create_tenant("acme")
    ctx.clients.create_tenant("strict", "required")
    ctx.clients.create_tenant("phr", "phishing_resistant")
    ident = Identity(ctx, hasher=cheap_hasher())
    ident.register(ctx.routes)
    ctx.sessions = ident
    yield Env(ctx, ident, clock)
    ctx.db.close()


def session_of(env: Env, browser: Browser) -> Any:
    raw = browser.cookies.get("pc_session")
    return env.ident.store.lookup(raw) if raw else None


# --- users and passwords ---

def test_install_sets_the_sessions_and_routes(tmp_path: Path) -> None:
    ctx = open_context(AuthServerConfig(issuer=ISSUER), tmp_path, KeyHasher(b"p" * 32), MemoryKeyStore())
    ident = install(ctx)
    assert identity_of(ctx) is ident and ctx.require_sessions() is ident
    assert {"/account/login", "/account/login/mfa", "/account/logout", "/account/security",
            "/account/static/passkey.js"} <= set(ctx.routes.paths)
    key = tmp_path / "secrets" / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


@pytest.mark.parametrize("password", ["qwerty123456", "QWERTY123456", "1qaz2wsx3edc", "Q1W2E3R4T5Y6"])
def test_breached_passwords_are_refused_case_insensitively(env: Env, password: str) -> None:
    with pytest.raises(WeakPasswordError, match="common or breached"):
        env.users.create("acme", "dave@acme.example", password, [])


@pytest.mark.parametrize(("password", "why"), [
    ("short-pw-1", "at least 12"),
    ("dave@acme.example-rocks", "username"),
    ("my name is dave, ok?", "username"),
    ("x" * 257, "at most"),
])
def test_weak_passwords_are_refused(env: Env, password: str, why: str) -> None:
    with pytest.raises(WeakPasswordError, match=why):
        env.users.create("acme", "Dave@Acme.example", password, [])


def test_create_rules(env: Env) -> None:
    u = env.users.create("acme", " Alice@Acme.Example ", PASSWORD, ["b", "a", "a"])
    assert u.username == "alice@acme.example" and u.roles == ("a", "b") and u.tenant == "acme"
    with pytest.raises(UserExistsError):
        env.users.create("acme", "ALICE@acme.example", PASSWORD, [])
    with pytest.raises(ValueError, match="no tenant"):
        env.users.create("nope", "zed@acme.example", PASSWORD, [])
    with pytest.raises(ValueError, match="email-like"):
        env.users.create("acme", "a b@c", PASSWORD, [])
    with env.ctx.db.engine.connect() as conn:
        stored = conn.execute(sa.select(tables.users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_policy_uses_the_bundled_list() -> None:
    policy = PasswordPolicy()
    assert policy.problem("password1234", "x@y.z") is not None
    assert policy.problem("a fine long passphrase", "x@y.z") is None


def test_rehash_on_login_when_parameters_change(env: Env) -> None:
    _uid, _ = env.user("alice@acme.example")
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
    users = Users(env.ctx, hasher=stronger)
    user, why = users.authenticate("alice@acme.example", PASSWORD)
    assert user is not None and why == "ok"
    with env.ctx.db.engine.connect() as conn:
        stored = conn.execute(sa.select(tables.users.c.password_hash)).scalar_one()
    assert "m=2048,t=2,p=1" in stored and not stronger.needs_rehash(stored)
    assert users.authenticate("alice@acme.example", PASSWORD)[0] is not None


def test_unknown_user_costs_one_verification_like_a_wrong_password(env: Env) -> None:
    env.user("alice@acme.example")
    h = env.users.hasher
    before = h.verifications
    assert env.users.authenticate("alice@acme.example", "wrong password here") == (None, "login.bad_password")
    assert h.verifications == before + 1
    assert env.users.authenticate("nobody@acme.example", "wrong password here") == (None, "login.unknown_user")
    assert h.verifications == before + 2
    assert env.users.authenticate("x" * 5000, "y" * 100_000) == (None, "login.unknown_user")
    assert h.verifications == before + 3


def test_set_password_and_disable_end_sessions(env: Env) -> None:
    uid, _ = env.user("alice@acme.example")
    env.ident.store.create(uid, ("pwd",), ACR_PASSWORD, _bare())
    env.users.set_password(uid, "another fine passphrase")
    with env.ctx.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tables.sessions)).scalar_one() == 0
    with pytest.raises(WeakPasswordError):
        env.users.set_password(uid, "password")
    raw, _ = env.ident.store.create(uid, ("pwd",), ACR_PASSWORD, _bare())
    assert env.users.disable(uid) and not env.users.disable(uid)
    assert env.ident.store.lookup(raw) is None
    assert env.users.authenticate("alice@acme.example", "another fine passphrase") == (None, "login.disabled")


def _bare() -> AsRequest:
    return AsRequest(method="GET", path="/", query={}, headers={}, body=b"", client_ip="127.0.0.1", scheme="http",
                     host="h", issuer=ISSUER, request_id="r")


# --- login page ---

async def test_password_login_redirects_to_return_to_with_a_new_session(env: Env) -> None:
    env.user("alice@acme.example")
    b = env.browser()
    r = await b.login("alice@acme.example", return_to="/oauth2/authorize?client_id=x&state=y")
    assert r.status == 303 and location(r) == "/oauth2/authorize?client_id=x&state=y"
    assert r.reason == "login.ok"
    cookie = next(v for k, v in r.headers if k == "set-cookie" and v.startswith("pc_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie and "Secure" not in cookie
    state = session_of(env, b)
    assert state.acr == ACR_PASSWORD and state.amr == ("pwd",) and state.username == "alice@acme.example"
    assert "pc_login" not in b.cookies  # the flow ended
    # The session's row holds a keyed hash, never the cookie value.
    with env.ctx.db.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(sa.select(tables.sessions.c.id_hash))]
    assert b.cookies["pc_session"] not in ids


async def test_unknown_user_and_wrong_password_answer_identically(env: Env) -> None:
    env.user("alice@acme.example")
    h = env.users.hasher
    answers: list[tuple[AsResponse, Browser]] = []
    for name in ("alice@acme.example", "nobody@acme.example"):
        b = env.browser(ip=f"203.0.113.{len(answers) + 1}")
        before = h.verifications
        r = await b.login(name, "wrong password for sure")
        assert h.verifications == before + 1  # the same argon2 work
        answers.append((r, b))
    (r1, _b1), (r2, _b2) = answers
    assert r1.status == r2.status == 401
    norm = [r.body.replace(token_in(r).encode(), b"T").replace(b"alice@", b"U").replace(b"nobody@", b"U")
            for r in (r1, r2)]
    assert norm[0] == norm[1]
    assert [k for k, _ in r1.headers] == [k for k, _ in r2.headers]
    assert (r1.reason, r2.reason) == ("login.bad_password", "login.unknown_user")
    assert b"incorrect" in r1.body and b"aria-describedby=\"form-error\"" in r1.body
    assert audit(r1)["username"] == "alice@acme.example"


async def test_login_page_is_accessible_and_self_contained(env: Env) -> None:
    r = await env.browser().call("GET", "/account/login")
    html = r.body.decode()
    assert '<html lang="en">' in html and "<h1>" in html
    assert 'autocomplete="username"' in html and 'autocomplete="current-password"' in html
    assert '<label for="username">' in html and '<label for="password">' in html
    assert "http://" not in html and "https://" not in html  # no external assets
    hdrs = dict(r.headers)
    assert "script-src 'self'" in hdrs["content-security-policy"]
    assert hdrs["referrer-policy"] == "same-origin"


async def test_disabled_user_gets_the_wrong_password_answer(env: Env) -> None:
    uid, _ = env.user("alice@acme.example")
    env.users.disable(uid)
    r = await env.browser().login("alice@acme.example")
    assert r.status == 401 and r.reason == "login.disabled" and b"incorrect" in r.body


@pytest.mark.parametrize("return_to", [
    "https://evil.example/", "//evil.example/x", "/\\evil.example", "\\\\evil.example", "http:/evil",
    "javascript:alert(1)", "/ok\r\nLocation: x", "evil.example", "/%0d%0a", "",
])
async def test_open_redirects_are_refused(env: Env, return_to: str) -> None:
    env.user("alice@acme.example")
    r = await env.browser().login("alice@acme.example", return_to=return_to)
    assert r.status == 303
    target = location(r)
    assert target == "/account/security" or (target == return_to and return_to == "/%0d%0a")
    assert urlsplit(target).netloc == "" and target.startswith("/") and not target.startswith("//")


def test_safe_return_to() -> None:
    assert safe_return_to("/oauth2/authorize?a=b&c=%2F%2F") == "/oauth2/authorize?a=b&c=%2F%2F"
    for bad in ("//x", "/\\x", "https://x/", "x", "/a b", "/\tx", None, "/" + "a" * 3000):
        assert safe_return_to(bad) is None


# --- CSRF ---

async def test_csrf_missing_wrong_and_cross_origin_are_refused(env: Env) -> None:
    env.user("alice@acme.example")
    b = env.browser()
    token = await b.form_token("/account/login")
    form = {"username": "alice@acme.example", "password": PASSWORD}
    h = env.users.hasher.verifications
    r = await b.call("POST", "/account/login", form)
    assert (r.status, r.reason) == (403, "csrf.missing")
    other = env.browser()
    other_token = await other.form_token("/account/login")
    r = await b.call("POST", "/account/login", {**form, "csrf_token": other_token})
    assert (r.status, r.reason) == (403, "csrf.mismatch")
    for origin in ("https://evil.example", "http://127.0.0.1:9998", "http://127.0.0.1"):
        r = await b.call("POST", "/account/login", {**form, "csrf_token": token}, origin=origin)
        assert (r.status, r.reason) == (403, "csrf.cross_origin")
    r = await b.call("POST", "/account/login", {**form, "csrf_token": token}, origin="null",
                     headers={"referer": "https://evil.example/"})
    assert (r.status, r.reason) == (403, "csrf.cross_origin")
    r = await b.call("POST", "/account/login", {**form, "csrf_token": other_token}, origin="null")
    assert (r.status, r.reason) == (403, "csrf.mismatch")  # an opaque origin still needs the token
    r = await b.call("POST", "/account/login", {**form, "csrf_token": token}, origin=None,
                     headers={"referer": "https://evil.example/page"})
    assert (r.status, r.reason) == (403, "csrf.cross_origin")
    assert env.users.hasher.verifications == h  # no password was checked
    # A token without its cookie (a forged cross-site post) fails too.
    r = await env.browser().call("POST", "/account/login", {**form, "csrf_token": token})
    assert (r.status, r.reason) == (403, "csrf.mismatch")
    r = await b.call("POST", "/account/login", {**form, "csrf_token": token}, origin=None,
                     headers={"referer": ISSUER + "/account/login"})
    assert r.status == 303


async def test_csrf_helpers_for_other_pages(env: Env) -> None:
    env.user("alice@acme.example")
    b = env.browser()
    await b.login("alice@acme.example")
    req = AsRequest(method="POST", path="/oauth2/consent", query={}, headers={"origin": ISSUER}, body=b"",
                    client_ip="1.2.3.4", scheme="http", host="h", issuer=ISSUER, request_id="r",
                    cookies=dict(b.cookies))
    token = csrf_token(env.ctx, req)
    assert token and Csrf.open(env.ctx).token(req) == token
    req.body = urlencode({"csrf_token": token}).encode()
    req.headers["content-type"] = "application/x-www-form-urlencoded"
    assert check_csrf(env.ctx, req)
    req.cookies = {}
    assert not check_csrf(env.ctx, AsRequest(method="POST", path="/x", query={}, headers={}, body=b"",
                                             client_ip="1", scheme="http", host="h", issuer=ISSUER, request_id="r"))


# --- sessions ---

async def test_session_fixation_new_id_at_every_login(env: Env) -> None:
    env.user("alice@acme.example")
    b = env.browser()
    b.cookies["pc_session"] = "attacker-chosen-value"
    await b.login("alice@acme.example")
    first = b.cookies["pc_session"]
    assert first != "attacker-chosen-value"
    r = await b.call("GET", "/account/login?force=1&return_to=/x")
    assert r.status == 200  # force: authenticate again despite the session
    r = await b.call("POST", "/account/login", {"username": "alice@acme.example", "password": PASSWORD,
                                                "csrf_token": token_in(r)})
    assert r.status == 303
    assert b.cookies["pc_session"] != first
    assert env.ident.store.lookup(first) is None  # the old id is dead


async def test_idle_and_absolute_expiry(env: Env) -> None:
    env.user("alice@acme.example")
    cfg = env.ctx.cfg
    b = env.browser()
    await b.login("alice@acme.example")
    raw = b.cookies["pc_session"]
    env.clock.now += cfg.session_idle_seconds - 5
    assert env.ident.store.lookup(raw) is not None  # activity resets the idle timer
    env.clock.now += cfg.session_idle_seconds - 5
    assert env.ident.store.lookup(raw) is not None
    env.clock.now += cfg.session_idle_seconds + 1
    assert env.ident.store.lookup(raw) is None  # idle
    await b.login("alice@acme.example")
    raw = b.cookies["pc_session"]
    start = env.clock.now
    while env.clock.now - start < cfg.session_absolute_seconds - cfg.session_idle_seconds:
        env.clock.now += cfg.session_idle_seconds - 10
        assert env.ident.store.lookup(raw) is not None
    env.clock.now = start + cfg.session_absolute_seconds + 1
    assert env.ident.store.lookup(raw) is None  # absolute, however active


async def test_logout_and_revoke_user_sessions(env: Env) -> None:
    uid, _ = env.user("alice@acme.example")
    b, c = env.browser(), env.browser()
    await b.login("alice@acme.example")
    await c.login("alice@acme.example")
    r = await b.call("GET", "/account/security")
    token = token_in(r)
    r = await b.call("POST", "/account/logout", {})
    assert r.status == 403  # CSRF applies to logout too
    r = await b.call("POST", "/account/logout", {"csrf_token": token})
    assert r.status == 303 and "pc_session" not in b.cookies
    assert session_of(env, c) is not None
    assert env.ident.revoke_user_sessions(uid) == 1
    assert session_of(env, c) is None


async def test_login_url_and_an_existing_session(env: Env) -> None:
    env.user("alice@acme.example")
    url = env.ident.login_url("/oauth2/authorize?x=1", acr=ACR_MFA)
    assert url.startswith("/account/login?") and parse_qs(urlsplit(url).query) == {
        "return_to": ["/oauth2/authorize?x=1"], "acr": [ACR_MFA]}
    assert "force=1" in env.ident.login_url("/a", force=True)
    assert "evil" not in env.ident.login_url("https://evil.example/")
    b = env.browser()
    await b.login("alice@acme.example")
    r = await b.call("GET", "/account/login?return_to=/back")
    assert r.status == 303 and location(r) == "/back"


# --- MFA ---

async def test_totp_login_replay_and_window(env: Env) -> None:
    _uid, secret = env.user("bob@acme.example", totp=True)
    assert secret
    app = pyotp.TOTP(secret)
    b = env.browser()
    r = await b.login("bob@acme.example")
    # A user who enrolled TOTP is asked for it even where the tenant does not require it.
    assert r.status == 303 and location(r) == "/account/login/mfa"
    assert session_of(env, b) is None  # no session before the second factor
    r = await b.mfa(app.at(env.clock.now - 90))
    assert (r.status, r.reason) == (401, "login.bad_totp")  # out of the ±1 step window
    code = app.at(env.clock.now - 30)  # one step behind: still accepted
    r = await b.mfa(code)
    assert r.status == 303 and location(r) == "/next"
    state = session_of(env, b)
    assert state.acr == ACR_MFA and set(state.amr) == {"pwd", "otp", "mfa"}
    c = env.browser(ip="198.51.100.8")
    await c.login("bob@acme.example")
    r = await c.mfa(code)
    assert (r.status, r.reason) == (401, "login.totp_replay")
    r = await c.mfa(app.at(env.clock.now - 60))  # an older step than the one used
    assert r.reason in ("login.totp_replay", "login.bad_totp") and r.status == 401
    r = await c.mfa(app.at(env.clock.now))
    assert r.status == 303


async def test_totp_secret_is_encrypted_at_rest(env: Env) -> None:
    _uid, secret = env.user("bob@acme.example", totp=True)
    assert secret
    for path in (env.ctx.db.path, env.ctx.db.path.with_name(env.ctx.db.path.name + "-wal")):
        assert not path.exists() or secret.encode() not in path.read_bytes()
    with env.ctx.db.engine.connect() as conn:
        sealed = conn.execute(sa.select(tables.users.c.totp_secret)).scalar_one()
    assert sealed.startswith("v1.") and secret not in sealed


async def test_recovery_codes_single_use_and_hashed(env: Env) -> None:
    uid, _ = env.user("bob@acme.example", totp=True)
    codes = env.users.new_recovery_codes(uid)
    assert len(codes) == 10 and len(set(codes)) == 10
    with env.ctx.db.engine.connect() as conn:
        stored = [r[0] for r in conn.execute(sa.select(tables.recovery_codes.c.code_hash))]
    assert not set(codes) & set(stored)
    b = env.browser()
    await b.login("bob@acme.example")
    r = await b.mfa(codes[0].upper().replace("-", " "))
    assert r.status == 303
    assert env.users.recovery_codes_left(uid) == 9
    c = env.browser()
    await c.login("bob@acme.example")
    r = await c.mfa(codes[0])
    assert (r.status, r.reason) == (401, "login.bad_recovery_code")
    other, _ = env.user("eve@acme.example")
    assert not env.users.use_recovery_code(other, codes[1])  # another user's code


async def test_required_policy_forces_enrolment(env: Env) -> None:
    uid, _ = env.user("sam@strict.example", tenant="strict")
    b = env.browser()
    r = await b.login("sam@strict.example", return_to="/app")
    assert r.status == 303 and location(r) == "/account/login/enroll"
    assert session_of(env, b) is None
    r = await b.call("GET", "/account/login/enroll")
    html = r.body.decode()
    secret = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', html).group(1).replace(" ", "")  # type: ignore[union-attr]
    assert "otpauth://totp/" in html and 'autocomplete="one-time-code"' in html
    r = await b.call("POST", "/account/login/enroll", {"code": "000000", "csrf_token": token_in(r)})
    assert r.status in (400, 200)
    r = await b.call("POST", "/account/login/enroll", {"code": pyotp.TOTP(secret).at(env.clock.now),
                                                       "csrf_token": token_in(r)})
    assert r.status == 200 and b"recovery codes" in r.body and b'href="/app"' in r.body
    assert env.users.recovery_codes_left(uid) == 10
    assert session_of(env, b).acr == ACR_MFA


async def test_required_policy_user_with_totp(env: Env) -> None:
    _, secret = env.user("sam@strict.example", tenant="strict", totp=True)
    b = env.browser()
    r = await b.login("sam@strict.example")
    assert location(r) == "/account/login/mfa"
    r = await b.mfa(pyotp.TOTP(secret or "").at(env.clock.now))
    assert r.status == 303 and session_of(env, b).acr == ACR_MFA


async def test_phishing_resistant_policy_refuses_totp_and_recovery_codes(env: Env) -> None:
    uid, secret = env.user("pat@phr.example", tenant="phr", totp=True)
    codes = env.users.new_recovery_codes(uid)
    b = env.browser()
    r = await b.login("pat@phr.example")
    # No passkey yet: enrol one (TOTP is not offered).
    assert location(r) == "/account/login/enroll"
    r = await b.call("GET", "/account/login/enroll")
    assert b"totp-secret" not in r.body and b'data-passkey="register"' in r.body
    r = await b.call("POST", "/account/login/enroll", {"code": pyotp.TOTP(secret or "").at(env.clock.now),
                                                       "csrf_token": token_in(r)})
    assert (r.status, r.reason) == (403, "login.factor_not_allowed")
    # Even at the MFA step (as if the user had a passkey), codes are refused unchecked.
    flow = env.ident.store.flow(_with_cookies(b))
    assert flow is not None
    env.ident.store.set_stage(flow, "mfa")
    for code in (pyotp.TOTP(secret or "").at(env.clock.now), codes[0]):
        r = await b.call("POST", "/account/login/mfa", {"code": code, "csrf_token": env.ident.csrf.token(
            _with_cookies(b))})
        assert (r.status, r.reason) == (403, "login.factor_not_allowed")
    assert env.users.recovery_codes_left(uid) == 10 and session_of(env, b) is None
    r = await b.call("GET", "/account/login/mfa")
    assert b"not accepted" in r.body and b'name="code"' not in r.body


def _with_cookies(b: Browser) -> AsRequest:
    req = _bare()
    req.cookies = dict(b.cookies)
    return req


async def test_step_up_asks_only_the_missing_factor(env: Env) -> None:
    uid, _ = env.user("alice@acme.example")
    b = env.browser()
    await b.login("alice@acme.example")
    first = b.cookies["pc_session"]
    secret = env.users.enroll_totp(uid)
    env.clock.now += 31
    h = env.users.hasher.verifications
    r = await b.call("GET", "/account/login?" + urlencode({"return_to": "/oauth2/authorize?x=1", "acr": ACR_MFA}))
    assert r.status == 303 and location(r) == "/account/login/mfa"
    r = await b.mfa(pyotp.TOTP(secret).at(env.clock.now))
    assert r.status == 303 and location(r) == "/oauth2/authorize?x=1"
    assert env.users.hasher.verifications == h  # no password asked again
    state = session_of(env, b)
    assert state.acr == ACR_MFA and set(state.amr) == {"pwd", "otp", "mfa"}
    assert state.auth_time == env.clock.now
    assert b.cookies["pc_session"] != first and env.ident.store.lookup(first) is None
    # Asking for phishing-resistant from an MFA session: a passkey is needed (enrol one).
    r = await b.call("GET", "/account/login?" + urlencode({"return_to": "/x", "acr": ACR_PHISHING_RESISTANT}))
    assert location(r) == "/account/login/enroll"


async def test_mfa_flow_ends_after_too_many_wrong_codes(env: Env) -> None:
    env.user("bob@acme.example", totp=True)
    b = env.browser()
    await b.login("bob@acme.example")
    token = await b.form_token("/account/login/mfa")
    for i in range(4):
        r = await b.call("POST", "/account/login/mfa", {"code": "000000", "csrf_token": token})
        assert (r.status, r.reason) == (401, "login.bad_totp")
        if i == 3:  # second-factor failures count on the account's counter too
            r = await b.call("POST", "/account/login/mfa", {"code": "000000", "csrf_token": token})
            assert (r.status, r.reason) == (429, "login.throttled")
        env.clock.now += 31
    r = await b.call("POST", "/account/login/mfa", {"code": "000000", "csrf_token": token})
    assert r.status == 401 and b"sign in again" in r.body.lower()
    assert "pc_login" not in b.cookies  # the flow is over: the password again
    r = await b.call("GET", "/account/login/mfa")
    assert r.status == 303 and location(r) == "/account/login"


async def test_mfa_page_needs_the_password_first(env: Env) -> None:
    r = await env.browser().call("GET", "/account/login/mfa")
    assert r.status == 303 and location(r) == "/account/login"
    b = env.browser()
    token = await b.form_token("/account/login")
    r = await b.call("POST", "/account/login/mfa", {"code": "123456", "csrf_token": token})
    assert r.status == 303  # a flow that has not passed the password step


# --- throttling ---

async def test_account_delays_lock_and_lift(env: Env) -> None:
    env.user("alice@acme.example")
    t = env.ctx.cfg.login_throttle
    h = env.users.hasher
    for i in range(t.lock_after_failures):
        b = env.browser(ip=f"192.0.2.{i}")  # a distributed attack: a new IP each time
        r = await b.login("alice@acme.example", "wrong password again")
        assert r.status == 401, i
        env.clock.now += t.max_delay_seconds + 1  # wait out each delay
    b = env.browser(ip="192.0.2.200")
    before = h.verifications
    r = await b.login("alice@acme.example")  # the right password, but locked
    assert (r.status, r.reason) == (429, "login.locked")
    assert h.verifications == before  # not even checked
    assert int(dict(r.headers)["retry-after"]) > t.lock_seconds - 2 * (t.max_delay_seconds + 1)
    assert b"Try again in" in r.body
    env.clock.now += t.lock_seconds
    r = await b.login("alice@acme.example")
    assert r.status == 303  # the lock lifted by itself


async def test_growing_delays_without_checking_the_password(env: Env) -> None:
    env.user("alice@acme.example")
    t = env.ctx.cfg.login_throttle
    b = env.browser()
    for _ in range(t.free_failures_per_account):
        r = await b.login("alice@acme.example", "wrong password again")
        assert r.status == 401
    h = env.users.hasher.verifications
    r = await b.login("alice@acme.example")
    assert (r.status, r.reason) == (429, "login.throttled") and dict(r.headers)["retry-after"] == "1"
    assert env.users.hasher.verifications == h  # the password was not checked
    for delay in (1, 2):
        env.clock.now += delay
        r = await b.login("alice@acme.example", "wrong password again")
        assert r.status == 401
        r = await b.login("alice@acme.example")
        assert dict(r.headers)["retry-after"] == str(delay * 2)  # doubling
    # Unknown usernames are throttled exactly the same way.
    for _ in range(t.free_failures_per_account):
        await env.browser(ip="192.0.2.55").login("ghost@acme.example", "wrong password again")
    r = await env.browser(ip="192.0.2.55").login("ghost@acme.example", "wrong password again")
    assert (r.status, r.reason) == (429, "login.throttled")


async def test_per_ip_throttling_of_credential_stuffing(env: Env) -> None:
    t = env.ctx.cfg.login_throttle
    b = env.browser(ip="203.0.113.9")
    for i in range(t.free_failures_per_ip):
        r = await b.login(f"victim{i}@acme.example", "stuffed password 1")
        assert r.status == 401
    r = await b.login("victim100@acme.example", "stuffed password 1")
    assert (r.status, r.reason) == (429, "login.throttled")
    env.user("alice@acme.example")
    r = await env.browser(ip="203.0.113.10").login("alice@acme.example")
    assert r.status == 303  # another source is not affected
    env.clock.now += t.ip_window_seconds + 1
    r = await b.login("victim101@acme.example", "stuffed password 1")
    assert r.status == 401  # the window passed


def test_throttle_persists_across_restarts(env: Env) -> None:
    t = env.ctx.cfg.login_throttle
    th = env.ident.throttle
    acct = th.account_key("alice@acme.example")
    for _ in range(t.lock_after_failures):
        th.failure(acct, None)
    again = LoginThrottle(env.ctx.db, t, env.ident.keys.throttle, env.clock)
    assert again.check(acct, None).reason == "login.locked"
    assert again.failures(acct) == t.lock_after_failures
    assert "alice" not in acct


def test_ipv6_sources_are_grouped_by_64() -> None:
    assert ip_key("2001:db8:1:2:3::4") == ip_key("2001:db8:1:2:ffff::1") != ip_key("2001:db8:1:3::1")
    assert ip_key("::ffff:192.0.2.1") == ip_key("192.0.2.1") == "ip:192.0.2.1"


# --- account pages ---

async def test_security_page_needs_a_fresh_session(env: Env) -> None:
    env.user("alice@acme.example")
    b = env.browser()
    r = await b.call("GET", "/account/security")
    assert r.status == 303 and location(r).startswith("/account/login?")
    await b.login("alice@acme.example")
    r = await b.call("GET", "/account/security")
    assert r.status == 200 and b"alice@acme.example" in r.body
    env.clock.now += 601
    r = await b.call("GET", "/account/security")
    assert r.status == 303 and "force=1" in location(r)


async def test_enrol_totp_and_regenerate_codes_from_the_security_page(env: Env) -> None:
    uid, _ = env.user("alice@acme.example")
    b = env.browser()
    await b.login("alice@acme.example")
    r = await b.call("GET", "/account/security/totp")
    secret = re.search(rb'id="totp-secret">([A-Z2-7 ]+)<', r.body).group(1).replace(b" ", b"").decode()  # type: ignore[union-attr]
    r = await b.call("POST", "/account/security/totp", {"code": "123456", "csrf_token": token_in(r)})
    assert r.status == 400 and secret.encode() in r.body.replace(b" ", b"")  # the same secret, again
    r = await b.call("POST", "/account/security/totp", {"code": pyotp.TOTP(secret).at(env.clock.now),
                                                        "csrf_token": token_in(r)})
    assert r.status == 200 and b"recovery codes" in r.body
    assert env.users.get(uid).has_totp  # type: ignore[union-attr]
    r = await b.call("GET", "/account/security")
    r = await b.call("POST", "/account/security/recovery-codes", {"csrf_token": token_in(r)})
    codes = re.findall(rb"<li>([a-z2-9-]{14})</li>", r.body)
    assert len(codes) == 10 and env.users.recovery_codes_left(uid) == 10


async def test_echoed_input_is_escaped(env: Env) -> None:
    r = await env.browser().login('"><script>alert(1)</script>@x.example', "some wrong password")
    assert r.status == 401
    assert b"<script>alert(1)" not in r.body and b"&lt;script&gt;alert(1)" in r.body


async def test_passkey_endpoints_need_a_login_flow(env: Env) -> None:
    b = env.browser()
    r = await b.call("POST", "/account/passkey/login/options", json_body={}, headers={"x-csrf-token": "x"})
    assert (r.status, r.reason) == (403, "csrf.mismatch")
    token = await b.form_token("/account/login")
    r = await b.call("POST", "/account/passkey/login/verify", json_body={"credential": "nope"},
                     headers={"x-csrf-token": token})
    assert (r.status, r.reason) == (400, "login.bad_passkey")
    r = await b.call("POST", "/account/passkey/login/verify", json_body={"credential": {"id": "AAAA"}},
                     headers={"x-csrf-token": token})
    assert (r.status, r.reason) == (401, "passkey.no_challenge")
    r = await b.call("POST", "/account/passkey/login/options", json_body={}, headers={"x-csrf-token": token})
    opts = json.loads(r.body)
    assert r.status == 200 and opts["userVerification"] == "required" and opts["allowCredentials"] == []
    r = await b.call("POST", "/account/passkey/login/verify", json_body={"credential": {"id": "AAAA"}},
                     headers={"x-csrf-token": token})
    assert (r.status, r.reason) == (401, "login.bad_passkey")
