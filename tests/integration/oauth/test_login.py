"""Browser login over real HTTP (requests as the browser, pyotp as the authenticator
app): password, TOTP, recovery codes, throttling, CSRF and cookies, against the
gateway with the authorization server mounted."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from urllib.parse import urlencode

import pyotp
import pytest
import requests

from portcullis.credentials.acr import ACR_MFA, ACR_PASSWORD
from portcullis.oauth.identity import identity_of
from portcullis.oauth.identity.pages import Identity
from tests.integration.harness import find_audit_event
from tests.integration.oauth.conftest import AsEnv

PASSWORD = "a long and unusual passphrase 7"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(as_env: AsEnv) -> Iterator[Clock]:
    """The server's clock, frozen and movable for this test (restored after)."""
    import time

    c = Clock(time.time())
    saved = as_env.ctx.clock
    as_env.ctx.clock = c
    yield c
    as_env.ctx.clock = saved
    # Failures recorded "in the future" would slow the next tests from this address.
    ident(as_env).throttle.clear(ident(as_env).throttle.ip_key("127.0.0.1"))


def ident(as_env: AsEnv) -> Identity:
    return identity_of(as_env.ctx)


def new_user(as_env: AsEnv, tenant: str = "acme", *, totp: bool = False) -> tuple[str, str | None]:
    name = f"u{secrets.token_hex(4)}@{tenant}.example"
    user = ident(as_env).users.create(tenant, name, PASSWORD, ["member"])
    return name, (ident(as_env).users.enroll_totp(user.user_id) if totp else None)


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf[-_]token" (?:value|content)="([^"]+)"', html)
    assert m, html[:400]
    return m.group(1)


class Browser:
    """A requests session that behaves like a browser posting forms from the page."""

    def __init__(self, as_env: AsEnv, ip: str | None = None) -> None:
        self.base = as_env.issuer
        self.s = requests.Session()
        self.s.headers["Origin"] = self.base
        if ip:  # the gateway trusts X-Forwarded-For only from configured proxies: not here
            self.s.headers["X-Forwarded-For"] = ip

    def get(self, path: str) -> requests.Response:
        return self.s.get(self.base + path, allow_redirects=False, timeout=10)

    def post(self, path: str, data: dict[str, str]) -> requests.Response:
        return self.s.post(self.base + path, data=data, allow_redirects=False, timeout=10)

    def login(self, username: str, password: str = PASSWORD, return_to: str = "/v1/health") -> requests.Response:
        page = self.get("/account/login?" + urlencode({"return_to": return_to}))
        assert page.status_code == 200
        return self.post("/account/login", {"username": username, "password": password,
                                            "csrf_token": csrf_of(page.text)})

    def mfa(self, code: str) -> requests.Response:
        page = self.get("/account/login/mfa")
        assert page.status_code == 200, page.status_code
        return self.post("/account/login/mfa", {"code": code, "csrf_token": csrf_of(page.text)})

    def cookie(self, name: str) -> str | None:
        return self.s.cookies.get(name)


def test_password_and_totp_login_returns_to_the_page(as_env: AsEnv) -> None:
    name, secret = new_user(as_env, totp=True)
    assert secret
    b = Browser(as_env)
    r = b.login(name, return_to="/v1/health?x=1")
    assert r.status_code == 303 and r.headers["location"] == "/account/login/mfa"
    assert b.cookie("pc_session") is None
    r = b.mfa(pyotp.TOTP(secret).now())
    assert r.status_code == 303 and r.headers["location"] == "/v1/health?x=1"
    set_cookie = r.headers["set-cookie"]
    assert "pc_session=" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert "Path=/" in set_cookie
    raw = b.cookie("pc_session")
    assert raw
    state = ident(as_env).store.lookup(raw)
    assert state is not None and state.acr == ACR_MFA and state.username == name
    event = find_audit_event(as_env.gateway, r.headers["x-request-id"])
    assert event.decision == "allow" and event.reason == "login.ok"
    # The gateway's own page answer: the security page for a fresh session.
    page = b.get("/account/security")
    assert page.status_code == 200 and name in page.text


def test_unknown_user_and_wrong_password_look_the_same(as_env: AsEnv) -> None:
    name, _ = new_user(as_env)
    hasher = ident(as_env).users.hasher
    seen = []
    for who in (name, "nobody-" + name):
        before = hasher.verifications
        r = Browser(as_env).login(who, "not the password at all")
        assert hasher.verifications == before + 1  # the same argon2 work for both
        body = r.text.replace(csrf_of(r.text), "T").replace(who, "U")
        seen.append((r.status_code, body, sorted(k.lower() for k in r.headers if k.lower() not in (
            "x-request-id", "date"))))
        event = find_audit_event(as_env.gateway, r.headers["x-request-id"])
        assert event.decision == "deny"
        assert event.reason == ("login.bad_password" if who == name else "login.unknown_user")
    assert seen[0] == seen[1]
    assert seen[0][0] == 401


def test_totp_replay_is_refused(as_env: AsEnv) -> None:
    name, secret = new_user(as_env, totp=True)
    code = pyotp.TOTP(secret or "").now()
    assert Browser(as_env).login(name).status_code == 303
    b1 = Browser(as_env)
    b1.login(name)
    assert b1.mfa(code).status_code == 303
    b2 = Browser(as_env)
    b2.login(name)
    r = b2.mfa(code)
    assert r.status_code == 401
    assert find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason == "login.totp_replay"


def test_recovery_code_works_once(as_env: AsEnv) -> None:
    name, _ = new_user(as_env, totp=True)
    user = ident(as_env).users.by_username(name)
    assert user
    codes = ident(as_env).users.new_recovery_codes(user.user_id)
    b = Browser(as_env)
    b.login(name)
    assert b.mfa(codes[3]).status_code == 303
    b = Browser(as_env)
    b.login(name)
    r = b.mfa(codes[3])
    assert r.status_code == 401
    assert find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason == "login.bad_recovery_code"


def test_lockout_is_reached_and_lifts_by_itself(as_env: AsEnv, clock: Clock) -> None:
    t = as_env.ctx.cfg.login_throttle
    name, _ = new_user(as_env)
    b = Browser(as_env)
    for _ in range(t.lock_after_failures):
        r = b.login(name, "wrong wrong wrong wrong")
        assert r.status_code == 401
        clock.now += t.max_delay_seconds  # outwait every delay
    r = b.login(name)  # the right password
    assert r.status_code == 429 and "Try again in" in r.text
    assert int(r.headers["retry-after"]) <= t.lock_seconds
    assert find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason == "login.locked"
    clock.now += t.lock_seconds + 1
    r = b.login(name)
    assert r.status_code == 303


def test_cross_origin_form_post_is_refused(as_env: AsEnv) -> None:
    name, _ = new_user(as_env)
    b = Browser(as_env)
    page = b.get("/account/login")
    token = csrf_of(page.text)
    r = b.s.post(as_env.issuer + "/account/login", data={"username": name, "password": PASSWORD,
                                                         "csrf_token": token},
                 headers={"Origin": "https://evil.example"}, allow_redirects=False, timeout=10)
    assert r.status_code == 403
    assert find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason == "csrf.cross_origin"
    r = b.post("/account/login", {"username": name, "password": PASSWORD})
    assert r.status_code == 403
    assert b.cookie("pc_session") is None


def test_open_redirect_is_refused(as_env: AsEnv) -> None:
    name, _ = new_user(as_env)
    r = Browser(as_env).login(name, return_to="//evil.example/steal")
    assert r.status_code == 303 and r.headers["location"] == "/account/security"


def test_step_up_from_a_password_session(as_env: AsEnv) -> None:
    name, _ = new_user(as_env)
    b = Browser(as_env)
    assert b.login(name).status_code == 303
    first = b.cookie("pc_session")
    state = ident(as_env).store.lookup(first or "")
    assert state and state.acr == ACR_PASSWORD
    user = ident(as_env).users.by_username(name)
    assert user
    secret = ident(as_env).users.enroll_totp(user.user_id)
    url = ident(as_env).login_url("/v1/health", acr=ACR_MFA)
    r = b.get(url)
    assert r.status_code == 303 and r.headers["location"] == "/account/login/mfa"
    r = b.mfa(pyotp.TOTP(secret).now())
    assert r.status_code == 303 and r.headers["location"] == "/v1/health"
    assert b.cookie("pc_session") != first
    again = ident(as_env).store.lookup(b.cookie("pc_session") or "")
    assert again and again.acr == ACR_MFA and "pwd" in again.amr and "otp" in again.amr


def test_static_assets_are_served_for_the_csp(as_env: AsEnv) -> None:
    r = requests.get(as_env.issuer + "/account/static/passkey.js", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "navigator.credentials" in r.text
    page = requests.get(as_env.issuer + "/account/login", timeout=10)
    assert '<script src="/account/static/passkey.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
