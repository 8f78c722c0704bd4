"""Step-up (RFC 9470) end to end: the gateway refuses a token whose `acr` is too weak or
whose `auth_time` is too old with the `insufficient_user_authentication` challenge; the
client sends the user back to the authorization server with `acr_values` / `max_age`,
the user steps up (here: enrols TOTP during login, pyotp computes the code), and the new
token passes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from portcullis.credentials.acr import ACR_MFA, ACR_PASSWORD
from portcullis.demo.upstream import UpstreamThread
from tests.integration.oauth.test_code_flow import Browser, FlowEnv, code_flow, make_flow_env

INVOICES = "/v1/tenants/acme/invoices"  # acr_values: [mfa] in the fixture
RECENT = "/v1/tenants/acme/recent"      # max_auth_age_seconds: 60


@pytest.fixture(scope="module")
def flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowEnv]:
    yield from make_flow_env(upstream, tmp_path_factory)

def _challenge(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    out = {"scheme": scheme}
    for part in rest.split(", "):
        k, _, v = part.partition("=")
        out[k] = v.strip('"')
    return out


def test_acr_step_up(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("stepup")
    browser = Browser(flow_env, flow_env.user("step"))
    _s, token = code_flow(flow_env, browser, client.client_id)
    assert flow_env.api(token["access_token"]).status_code == 200  # projects: no step-up needed
    r = flow_env.api(token["access_token"], INVOICES)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/insufficient-user-authentication")
    ch = _challenge(r.headers["www-authenticate"])
    assert ch["scheme"] == "Bearer" and ch["error"] == "insufficient_user_authentication"
    assert ch["acr_values"] == ACR_MFA
    # The client asks the authorization server for that acr; the same browser steps up.
    logins = browser.logins
    _s, stepped = code_flow(flow_env, browser, client.client_id, acr_values=ch["acr_values"])
    assert browser.enrolled_secret is not None  # the user proved a second factor
    assert browser.logins == logins  # no password again: only the missing factor
    assert flow_env.api(stepped["access_token"], INVOICES).status_code == 200


def test_prompt_none_with_too_weak_session_is_login_required(flow_env: FlowEnv) -> None:
    from tests.integration.oauth.test_code_flow import query, raw_code

    client, _ = flow_env.client("stepup-silent")
    browser = Browser(flow_env, flow_env.user("weak"))
    raw_code(flow_env, browser, client.client_id)
    before = browser.logins
    from tests.integration.oauth.test_code_flow import authorize_url, pkce_pair

    _v, challenge = pkce_pair()
    r = browser.authorize(authorize_url(flow_env, response_type="code", client_id=client.client_id,
                                        redirect_uri="http://127.0.0.1:9/cb", acr_values=ACR_MFA, prompt="none",
                                        code_challenge=challenge, code_challenge_method="S256"))
    assert query(r)["error"] == "login_required" and browser.logins == before


def test_acr_values_weaker_than_session_need_no_login(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("stepup-weak")
    browser = Browser(flow_env, flow_env.user("pwd"))
    code_flow(flow_env, browser, client.client_id)
    before = browser.logins
    code_flow(flow_env, browser, client.client_id, acr_values=ACR_PASSWORD)
    assert browser.logins == before


def test_max_auth_age_step_up(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("maxage")
    browser = Browser(flow_env, flow_env.user("old"))
    # The user logged in two minutes ago (the server's clock, as the identity pages see it).
    flow_env.shifted_clock(-120)
    try:
        _s, token = code_flow(flow_env, browser, client.client_id)
    finally:
        flow_env.restore_clock()
    assert flow_env.api(token["access_token"]).status_code == 200
    r = flow_env.api(token["access_token"], RECENT)
    assert r.status_code == 401
    ch = _challenge(r.headers["www-authenticate"])
    assert ch["error"] == "insufficient_user_authentication" and ch["max_age"] == "60"
    logins = browser.logins
    _s, fresh = code_flow(flow_env, browser, client.client_id, max_age=ch["max_age"])
    assert browser.logins == logins + 1  # authenticated again
    assert flow_env.api(fresh["access_token"], RECENT).status_code == 200
    auth_time = _claims(flow_env, fresh["access_token"])["auth_time"]
    assert isinstance(auth_time, int) and abs(time.time() - auth_time) < 30


def _claims(env: FlowEnv, token: str) -> dict[str, object]:
    import requests
    from joserfc import jwt
    from joserfc.jwk import KeySet

    keys = KeySet.import_key_set(requests.get(env.url("/oauth2/jwks"), timeout=10).json())
    return dict(jwt.decode(token, keys).claims)
