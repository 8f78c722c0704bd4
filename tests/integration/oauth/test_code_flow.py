"""Authorization code + PKCE end to end, over real HTTP, driven by requests-oauthlib
(an independent client) against the real gateway with the authorization server mounted.

The user logs in through the real identity pages (a `requests.Session` is the browser).
Tokens are then used at the gateway's own routes, which trust the issuer, so
revocations (code reuse, granted-app revoke) are checked where they matter.

`FlowEnv`, `Browser` and `make_flow_env` (the fixture's body) are shared by test_refresh_flow.py and
test_step_up.py.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest
import requests
import requests.auth
from joserfc import jwt
from joserfc.jwk import KeySet
from requests_oauthlib import OAuth2Session

from portcullis.credentials.acr import ACR_MFA
from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.identity import identity_of
from portcullis.oauth.models import Client
from portcullis.oauth.service import AuthContext
from tests.integration.harness import GatewayThread, free_port, write_config
from tests.integration.oauth.conftest import oauth_storage

# oauthlib refuses http:// unless told; the test gateway listens on loopback without TLS.
os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"

REDIRECT = "http://127.0.0.1:9/cb"
PASSWORD = "correct horse battery staple 42!"
SCOPES = ["openid", "profile", "offline_access", "projects:read", "billing:read"]
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class FlowEnv:
    port: int
    issuer: str
    data_dir: Path
    gateway: GatewayThread
    ctx: AuthContext

    def url(self, path: str) -> str:
        return self.issuer + path

    def client(self, name: str, *, auth: str = "none", first_party: bool = True, require_par: bool = False,
               grants: tuple[str, ...] = ("authorization_code", "refresh_token"),
               scopes: list[str] | None = None) -> tuple[Client, str | None]:
        return self.ctx.clients.create_client(
            name=f"{name}-{secrets.token_hex(3)}", tenant="acme", auth_method=auth, grant_types=list(grants),
            scopes=scopes or SCOPES, redirect_uris=[REDIRECT], first_party=first_party, require_par=require_par)

    def user(self, prefix: str = "user") -> str:
        username = f"{prefix}-{secrets.token_hex(3)}@acme.example"
        identity_of(self.ctx).users.create("acme", username, PASSWORD, ["tenant-admin"])
        return username

    @staticmethod
    def decode_sub(token: str) -> str:
        """The `sub` of one of our JWTs (unverified: the test only reads it)."""
        payload = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])

    def api(self, token: str, path: str = "/v1/tenants/acme/projects") -> requests.Response:
        return requests.get(self.url(path), headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def wait_refused(self, token: str, path: str = "/v1/tenants/acme/projects") -> requests.Response:
        """The gateway refuses a revoked token within 0.25 s (issue 4); poll up to 3 s."""
        deadline = time.monotonic() + 3
        while True:
            r = self.api(token, path)
            if r.status_code == 401 or time.monotonic() > deadline:
                return r
            time.sleep(0.05)

    def shifted_clock(self, seconds: float) -> Callable[[], None]:
        """Move the authorization server's clock; returns the undo."""
        self.ctx.clock = lambda: time.time() + seconds
        return self.restore_clock

    def restore_clock(self) -> None:
        self.ctx.clock = time.time


def make_flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory, *,
                  on_postgres: bool | None = None) -> Iterator[FlowEnv]:
    """A gateway whose routes accept the issuer's tokens, with step-up routes (shared).
    Its stores are on PostgreSQL when `on_postgres` (None: as `oauth_storage` decides)."""
    with oauth_storage(on_postgres) as storage:
        yield from _flow_env(upstream, tmp_path_factory, storage)


def _flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory,
              storage: dict[str, Any] | None) -> Iterator[FlowEnv]:
    data_dir = tmp_path_factory.mktemp("flow")
    port, mport = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    doc = demo_config(upstream.url, port, mport)
    doc["auth_server"] = {"issuer": issuer, "refresh_idle_seconds": 300, "refresh_absolute_seconds": 600}
    for route in doc["routes"]:
        if not route.get("public"):
            route["auth"] = ["api_key", "jwt"]
        if route["name"] == "list-invoices":
            route["acr_values"] = [ACR_MFA]  # step-up (RFC 9470)
    doc["routes"].append({"name": "recent-projects", "methods": ["GET"], "path": "/v1/tenants/{tenant}/recent",
                          "upstream": "demo-api", "upstream_path": "/v1/tenants/{tenant}/projects",
                          "auth": ["jwt"], "scopes": ["projects:read"], "tenant_param": "tenant",
                          "max_auth_age_seconds": 60})
    if storage is not None:
        doc["storage"] = storage
    loaded = write_config(data_dir, doc)
    gw = GatewayThread(loaded)
    gw.start()
    try:
        auth = gw.gw.auth_server
        assert auth is not None
        auth.ctx.clients.create_tenant("acme")
        env = FlowEnv(port, issuer, loaded.data_dir, gw, auth.ctx)
        yield env
        env.restore_clock()
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowEnv]:
    yield from make_flow_env(upstream, tmp_path_factory)


class Browser:
    """A user agent: cookies, no automatic redirects, and the identity pages filled in."""

    def __init__(self, env: FlowEnv, username: str | None = None, totp: Callable[[], str] | None = None) -> None:
        self.env = env
        self.s = requests.Session()
        self.username = username
        self.totp = totp
        self.logins = 0
        self.enrolled_secret: str | None = None

    def get(self, url: str) -> requests.Response:
        return self.s.get(urljoin(self.env.issuer + "/", url), allow_redirects=False, timeout=10)

    def post(self, url: str, data: dict[str, str]) -> requests.Response:
        return self.s.post(urljoin(self.env.issuer + "/", url), data=data, allow_redirects=False, timeout=10)

    def authorize(self, url: str, *, consent: str | None = None) -> requests.Response:
        """Follow the authorization request until the redirect to the client (returned
        unfollowed), or a page we cannot get past (returned). Logs in when asked;
        answers the consent page with `consent` ("allow"/"deny") if given."""
        r = self.get(url)
        for _ in range(20):
            if r.status_code in (302, 303):
                loc = r.headers["location"]
                if not loc.startswith(("/", self.env.issuer + "/")):
                    return r  # back to the client
                r = self.get(loc)
                continue
            if r.status_code != 200:
                return r
            body = r.text
            csrf = m.group(1) if (m := _CSRF.search(body)) else ""
            if 'action="/account/login"' in body and self.username:
                self.logins += 1
                r = self.post("/account/login", {"csrf_token": csrf, "username": self.username,
                                                 "password": PASSWORD})
            elif 'action="/account/login/mfa"' in body and self.totp:
                r = self.post("/account/login/mfa", {"csrf_token": csrf, "code": self.totp()})
            elif 'action="/account/login/enroll"' in body and (sm := re.search(r'id="totp-secret">([^<]+)<', body)):
                import pyotp

                self.enrolled_secret = sm.group(1).replace(" ", "")
                code = pyotp.TOTP(self.enrolled_secret).now()
                r = self.post("/account/login/enroll", {"csrf_token": csrf, "code": code})
            elif (nm := re.search(r'class="button" href="([^"]+)"', body)) and "recovery codes" in body.lower():
                r = self.get(html.unescape(nm.group(1)))
            elif 'action="/oauth2/consent"' in body and consent:
                fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body))
                r = self.post("/oauth2/consent", {**{k: html.unescape(v) for k, v in fields.items()},
                                                  "decision": consent})
            else:
                return r
        raise AssertionError("too many steps")


def query(resp: requests.Response) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["location"]).query).items()}


def oauth_session(env: FlowEnv, client_id: str, scope: list[str] | None = None) -> OAuth2Session:
    return OAuth2Session(client_id, redirect_uri=REDIRECT, scope=scope or SCOPES, pkce="S256")


def code_flow(env: FlowEnv, browser: Browser, client_id: str, *, scope: list[str] | None = None,
              secret: str | None = None, **extra: str) -> tuple[OAuth2Session, dict[str, Any]]:
    """The whole flow with requests-oauthlib: authorization URL, browser, token."""
    sess = oauth_session(env, client_id, scope)
    url, _state = sess.authorization_url(env.url("/oauth2/authorize"), **extra)
    r = browser.authorize(url)
    assert r.status_code in (302, 303), r.text[:500]
    auth = requests.auth.HTTPBasicAuth(client_id, secret) if secret else None
    token: dict[str, Any] = sess.fetch_token(env.url("/oauth2/token"), authorization_response=r.headers["location"],
                                             include_client_id=secret is None, auth=auth)
    return sess, token


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_url(env: FlowEnv, **params: str) -> str:
    return env.url("/oauth2/authorize?" + urlencode(params))


def raw_code(env: FlowEnv, browser: Browser, client_id: str, **params: str) -> tuple[str, str]:
    """A code obtained without requests-oauthlib (for attacks on the token endpoint)."""
    verifier, challenge = pkce_pair()
    base = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "scope": "openid projects:read",
            "state": "st", "code_challenge": challenge, "code_challenge_method": "S256"}
    r = browser.authorize(authorize_url(env, **{**base, **params}))
    q = query(r)
    assert "code" in q, q
    return q["code"], verifier


def redeem(env: FlowEnv, client_id: str, code: str, verifier: str | None, **extra: str) -> requests.Response:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": client_id,
            **extra}
    if verifier is not None:
        form["code_verifier"] = verifier
    return requests.post(env.url("/oauth2/token"), data=form, timeout=10)


# --- the happy path ---

def test_code_flow_with_pkce_by_requests_oauthlib(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("spa")
    username = flow_env.user()
    browser = Browser(flow_env, username)
    nonce = secrets.token_urlsafe(16)
    sess, token = code_flow(flow_env, browser, client.client_id, nonce=nonce)
    assert token["token_type"].lower() == "bearer"
    assert token["refresh_token"].startswith("prt_")
    assert flow_env.api(token["access_token"]).status_code == 200
    # The ID token: signed by the issuer's key, typ JWT, for this client, with nonce and at_hash.
    keys = KeySet.import_key_set(requests.get(flow_env.url("/oauth2/jwks"), timeout=10).json())
    idt = jwt.decode(token["id_token"], keys, algorithms=["ES256", "EdDSA"])
    assert idt.header["typ"] == "JWT"
    c = idt.claims
    assert c["iss"] == flow_env.issuer and c["aud"] == client.client_id and c["nonce"] == nonce
    assert c["acr"] and c["amr"] == ["pwd"] and abs(c["auth_time"] - time.time()) < 60
    at_hash = base64.urlsafe_b64encode(hashlib.sha256(token["access_token"].encode()).digest()[:16]).rstrip(b"=")
    assert c["at_hash"] == at_hash.decode()
    # UserInfo with the access token.
    ui = sess.get(flow_env.url("/oauth2/userinfo"), timeout=10)
    assert ui.status_code == 200
    assert ui.json() == {"sub": c["sub"], "tenant": "acme", "preferred_username": username}


def test_iss_in_success_and_error_responses_rfc9207(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("iss")
    browser = Browser(flow_env, flow_env.user())
    _v, challenge = pkce_pair()
    base = {"response_type": "code", "client_id": client.client_id, "redirect_uri": REDIRECT, "state": "s1",
            "scope": "projects:read", "code_challenge": challenge, "code_challenge_method": "S256"}
    ok = query(browser.authorize(authorize_url(flow_env, **base)))
    assert ok["iss"] == flow_env.issuer and ok["state"] == "s1" and ok["code"]
    err = query(browser.authorize(authorize_url(flow_env, **{**base, "prompt": "bogus"})))
    assert err == {"error": "invalid_request", "error_description": err["error_description"], "state": "s1",
                   "iss": flow_env.issuer}
    meta = requests.get(flow_env.url("/.well-known/openid-configuration"), timeout=10).json()
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert meta["pushed_authorization_request_endpoint"] == flow_env.url("/oauth2/par")


# --- redirect URI ---

@pytest.mark.parametrize("uri", ["https://evil.example/cb", REDIRECT + "/x", REDIRECT + "?a=1",
                                 "http://127.0.0.1:9/CB", "http://localhost:9/cb"])
def test_redirect_mismatch_is_an_error_page_never_a_redirect(flow_env: FlowEnv, uri: str) -> None:
    client, _ = flow_env.client("redir")
    _v, challenge = pkce_pair()
    r = Browser(flow_env).get(authorize_url(flow_env, response_type="code", client_id=client.client_id,
                                            redirect_uri=uri, code_challenge=challenge, code_challenge_method="S256",
                                            state="x"))
    assert r.status_code == 400
    assert "location" not in r.headers
    assert r.headers["content-type"].startswith("text/html")
    assert "evil" not in r.text or "&" not in uri  # escaped, not reflected raw


def test_loopback_redirect_port_may_vary_rfc8252(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("native")
    browser = Browser(flow_env, flow_env.user())
    _v, challenge = pkce_pair()
    r = browser.authorize(authorize_url(flow_env, response_type="code", client_id=client.client_id,
                                        redirect_uri="http://127.0.0.1:51234/cb", code_challenge=challenge,
                                        code_challenge_method="S256"))
    assert r.headers["location"].startswith("http://127.0.0.1:51234/cb?code=")


def test_unknown_client_is_an_error_page(flow_env: FlowEnv) -> None:
    r = Browser(flow_env).get(authorize_url(flow_env, response_type="code", client_id="cl_nope",
                                            redirect_uri=REDIRECT))
    assert r.status_code == 400 and "location" not in r.headers


def test_only_response_type_code(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("implicit")
    for rt in ("token", "id_token", "code id_token"):
        q = query(Browser(flow_env).get(authorize_url(flow_env, response_type=rt, client_id=client.client_id,
                                                      redirect_uri=REDIRECT, state="z")))
        assert q["error"] == "unsupported_response_type" and q["iss"] == flow_env.issuer


# --- PKCE downgrades ---

def test_pkce_required_and_s256_only(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("pkce")
    browser = Browser(flow_env, flow_env.user())
    verifier, challenge = pkce_pair()
    base = {"response_type": "code", "client_id": client.client_id, "redirect_uri": REDIRECT, "state": "p"}
    missing = query(browser.authorize(authorize_url(flow_env, **base)))
    assert missing["error"] == "invalid_request" and "code_challenge" in missing["error_description"]
    plain = query(browser.authorize(authorize_url(flow_env, **base, code_challenge=verifier,
                                                  code_challenge_method="plain")))
    assert plain["error"] == "invalid_request"
    no_method = query(browser.authorize(authorize_url(flow_env, **base, code_challenge=verifier)))
    assert no_method["error"] == "invalid_request"  # absent method means plain (RFC 7636 §4.3)
    ok = query(browser.authorize(authorize_url(flow_env, **base, code_challenge=challenge,
                                               code_challenge_method="S256")))
    assert "code" in ok


def test_wrong_or_missing_verifier_refused_and_code_survives_only_for_the_right_one(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("verifier")
    browser = Browser(flow_env, flow_env.user())
    code, verifier = raw_code(flow_env, browser, client.client_id)
    wrong = redeem(flow_env, client.client_id, code, pkce_pair()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert redeem(flow_env, client.client_id, code, None).json()["error"] == "invalid_request"
    assert redeem(flow_env, client.client_id, code, "short").json()["error"] == "invalid_request"
    ok = redeem(flow_env, client.client_id, code, verifier)
    assert ok.status_code == 200, ok.text


# --- codes ---

def test_code_reuse_refused_and_revokes_its_tokens(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("reuse")
    browser = Browser(flow_env, flow_env.user())
    code, verifier = raw_code(flow_env, browser, client.client_id, scope="openid offline_access projects:read")
    first = redeem(flow_env, client.client_id, code, verifier)
    assert first.status_code == 200
    tokens = first.json()
    assert flow_env.api(tokens["access_token"]).status_code == 200
    again = redeem(flow_env, client.client_id, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # RFC 6749 §4.1.2: everything issued from the code is revoked.
    assert flow_env.wait_refused(tokens["access_token"]).status_code == 401
    r = requests.post(flow_env.url("/oauth2/token"), data={"grant_type": "refresh_token", "client_id": client.client_id,
                                                         "refresh_token": tokens["refresh_token"]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_code_bound_to_client_and_expires(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("bound")
    other, _ = flow_env.client("other")
    browser = Browser(flow_env, flow_env.user())
    code, verifier = raw_code(flow_env, browser, client.client_id)
    assert redeem(flow_env, other.client_id, code, verifier).json()["error"] == "invalid_grant"
    undo = flow_env.shifted_clock(61)
    try:
        assert redeem(flow_env, client.client_id, code, verifier).json()["error"] == "invalid_grant"
    finally:
        undo()


def test_concurrent_redemptions_one_wins(flow_env: FlowEnv) -> None:
    import threading

    client, _ = flow_env.client("race")
    browser = Browser(flow_env, flow_env.user())
    code, verifier = raw_code(flow_env, browser, client.client_id)
    barrier = threading.Barrier(2)
    results: list[requests.Response] = []

    def go() -> None:
        barrier.wait()
        results.append(redeem(flow_env, client.client_id, code, verifier))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 400]
    winner = next(r for r in results if r.status_code == 200).json()
    assert flow_env.wait_refused(winner["access_token"]).status_code == 401


def test_dpop_jkt_binds_the_code_rfc9449_s10(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("dpopjkt")
    browser = Browser(flow_env, flow_env.user())
    code, verifier = raw_code(flow_env, browser, client.client_id, dpop_jkt="A" * 43)
    r = redeem(flow_env, client.client_id, code, verifier)  # no DPoP proof at all
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


# --- prompt, max_age ---

def test_prompt_none_without_session(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("silent")
    _v, challenge = pkce_pair()
    q = query(Browser(flow_env).get(authorize_url(flow_env, response_type="code", client_id=client.client_id,
                                                  redirect_uri=REDIRECT, state="n", prompt="none",
                                                  code_challenge=challenge, code_challenge_method="S256")))
    assert q == {"error": "login_required", "error_description": q["error_description"], "state": "n",
                 "iss": flow_env.issuer}


def test_prompt_none_with_session_issues_silently(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("silent2")
    browser = Browser(flow_env, flow_env.user())
    raw_code(flow_env, browser, client.client_id)
    before = browser.logins
    code, _ = raw_code(flow_env, browser, client.client_id, prompt="none")
    assert code and browser.logins == before


def test_prompt_login_and_max_age_force_reauthentication(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("reauth")
    browser = Browser(flow_env, flow_env.user())
    raw_code(flow_env, browser, client.client_id)
    assert browser.logins == 1
    raw_code(flow_env, browser, client.client_id)
    assert browser.logins == 1  # the session is reused
    raw_code(flow_env, browser, client.client_id, prompt="login")
    assert browser.logins == 2
    raw_code(flow_env, browser, client.client_id, max_age="3600")
    assert browser.logins == 2  # recent enough
    raw_code(flow_env, browser, client.client_id, max_age="0")
    assert browser.logins == 3


# --- consent ---

def test_consent_shown_for_third_party_only_and_remembered(flow_env: FlowEnv) -> None:
    first, _ = flow_env.client("first")
    third, _ = flow_env.client("third", first_party=False)
    browser = Browser(flow_env, flow_env.user())
    raw_code(flow_env, browser, first.client_id)  # no consent page for a first-party client
    _v, challenge = pkce_pair()
    url = authorize_url(flow_env, response_type="code", client_id=third.client_id, redirect_uri=REDIRECT,
                        scope="openid projects:read", state="c", code_challenge=challenge,
                        code_challenge_method="S256")
    page = browser.authorize(url)
    assert page.status_code == 200 and 'action="/oauth2/consent"' in page.text
    assert "Read your projects" in page.text and third.name in page.text and '<html lang="en">' in page.text
    assert query(browser.authorize(url, consent="allow"))["state"] == "c"
    assert "code" in query(browser.authorize(url))  # remembered
    # prompt=none for more scopes than granted: consent_required, no page.
    more = query(browser.authorize(url.replace("scope=openid+projects%3Aread", "scope=openid+billing%3Aread")
                                   + "&prompt=none"))
    assert more["error"] == "consent_required"


def test_consent_deny_and_csrf(flow_env: FlowEnv) -> None:
    third, _ = flow_env.client("third-deny", first_party=False)
    browser = Browser(flow_env, flow_env.user())
    _v, challenge = pkce_pair()
    url = authorize_url(flow_env, response_type="code", client_id=third.client_id, redirect_uri=REDIRECT,
                        scope="projects:read", state="d", code_challenge=challenge, code_challenge_method="S256")
    page = browser.authorize(url)
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    forged = browser.post("/oauth2/consent", {**fields, "csrf_token": "x" * 43, "decision": "allow"})
    assert forged.status_code == 403 and "location" not in forged.headers
    denied = query(browser.authorize(url, consent="deny"))
    assert denied["error"] == "access_denied" and denied["iss"] == flow_env.issuer


def test_granted_apps_page_lists_and_revokes(flow_env: FlowEnv) -> None:
    third, _ = flow_env.client("third-apps", first_party=False)
    browser = Browser(flow_env, flow_env.user())
    sess = oauth_session(flow_env, third.client_id, ["projects:read"])
    url, _ = sess.authorization_url(flow_env.url("/oauth2/authorize"))
    r = browser.authorize(url, consent="allow")
    token = sess.fetch_token(flow_env.url("/oauth2/token"), authorization_response=r.headers["location"],
                             include_client_id=True)
    assert flow_env.api(token["access_token"]).status_code == 200
    page = browser.get("/account/apps")
    assert page.status_code == 200 and third.name in page.text and "Read your projects" in page.text
    csrf = _CSRF.search(page.text)
    assert csrf is not None
    forged = browser.post("/account/apps", {"csrf_token": "nope", "client_id": third.client_id})
    assert forged.status_code == 403
    done = browser.post("/account/apps", {"csrf_token": html.unescape(csrf.group(1)), "client_id": third.client_id})
    assert done.status_code == 200 and "was revoked" in done.text
    assert flow_env.wait_refused(token["access_token"]).status_code == 401
    refreshed = requests.post(flow_env.url("/oauth2/token"), data={
        "grant_type": "refresh_token", "client_id": third.client_id, "refresh_token": token["refresh_token"]},
        timeout=10)
    assert refreshed.json()["error"] == "invalid_grant"
    assert third.name not in browser.get("/account/apps").text
    # The consent is forgotten too: the page is shown again.
    assert 'action="/oauth2/consent"' in browser.authorize(url).text


def test_userinfo_refusals(flow_env: FlowEnv) -> None:
    r = requests.get(flow_env.url("/oauth2/userinfo"), timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = requests.get(flow_env.url("/oauth2/userinfo"), headers={"Authorization": "Bearer abc.def.ghi"}, timeout=10)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    client, _ = flow_env.client("noopenid")
    _s, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id, scope=["projects:read"])
    r = requests.get(flow_env.url("/oauth2/userinfo"), headers={"Authorization": f"Bearer {token['access_token']}"},
                     timeout=10)
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]


# --- PAR ---

def _par(env: FlowEnv, client: Client, secret: str, **params: str) -> requests.Response:
    return requests.post(env.url("/oauth2/par"), data=params, auth=(client.client_id, secret), timeout=10)


def test_par_required_used_once_and_expires(flow_env: FlowEnv) -> None:
    client, secret = flow_env.client("par", auth="client_secret_basic", require_par=True)
    assert secret is not None
    browser = Browser(flow_env, flow_env.user())
    verifier, challenge = pkce_pair()
    params = {"response_type": "code", "client_id": client.client_id, "redirect_uri": REDIRECT, "state": "par",
              "scope": "openid projects:read", "code_challenge": challenge, "code_challenge_method": "S256"}
    # Without PAR: refused (RFC 9126 §5), back to the (verified) redirect URI.
    direct = query(browser.authorize(authorize_url(flow_env, **params)))
    assert direct["error"] == "invalid_request" and direct["iss"] == flow_env.issuer
    # Client authentication is required at the PAR endpoint.
    assert _par(flow_env, client, "wrong", **params).status_code == 401
    # An invalid request is refused at push time, as JSON.
    bad = _par(flow_env, client, secret, **{**params, "redirect_uri": "https://evil.example/cb"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    pushed = _par(flow_env, client, secret, **params)
    assert pushed.status_code == 201, pushed.text
    doc = pushed.json()
    assert doc["request_uri"].startswith("urn:ietf:params:oauth:request_uri:")
    assert doc["expires_in"] == flow_env.ctx.cfg.par_lifetime_seconds
    url = authorize_url(flow_env, client_id=client.client_id, request_uri=doc["request_uri"])
    q = query(browser.authorize(url))
    assert q["state"] == "par" and q["iss"] == flow_env.issuer
    tok = requests.post(flow_env.url("/oauth2/token"), auth=(client.client_id, secret), timeout=10, data={
        "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT, "code_verifier": verifier})
    assert tok.status_code == 200, tok.text
    # Used once.
    again = browser.get(url)
    assert again.status_code == 400 and "location" not in again.headers
    # Another client cannot use it; an expired one is refused.
    doc2 = _par(flow_env, client, secret, **params).json()
    other, _ = flow_env.client("par-other")
    assert browser.get(authorize_url(flow_env, client_id=other.client_id,
                                     request_uri=doc2["request_uri"])).status_code == 400
    doc3 = _par(flow_env, client, secret, **params).json()
    undo = flow_env.shifted_clock(flow_env.ctx.cfg.par_lifetime_seconds + 1)
    try:
        expired = browser.get(authorize_url(flow_env, client_id=client.client_id, request_uri=doc3["request_uri"]))
    finally:
        undo()
    assert expired.status_code == 400 and "location" not in expired.headers
