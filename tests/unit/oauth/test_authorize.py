"""The authorization endpoint's pure parts: extra parameters, `iss` responses
(RFC 9207), consent page escaping, and the gateway's step-up check (RFC 9470)."""

from __future__ import annotations

from typing import Any

import pytest
from authlib.oauth2.rfc6749 import OAuth2Error

from portcullis.credentials.acr import ACR_MFA, ACR_PASSWORD, ACR_PHISHING_RESISTANT
from portcullis.exchange import Principal
from portcullis.oauth.authorize import parse_extras, stronger
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.consent import consent_page, consent_required, describe
from portcullis.oauth.models import Client, LoginState
from portcullis.oauth.rfc9207 import authorization_response
from portcullis.stages.authorize import step_up
from portcullis.stages.route import RouteConfig

CFG = AuthServerConfig(issuer="https://as.example", resources=["https://api.example"])


def dl(**kw: str | list[str]) -> dict[str, list[str]]:
    return {k: v if isinstance(v, list) else [v] for k, v in kw.items()}


def test_extras_parsed() -> None:
    ex = parse_extras(dl(nonce="n", prompt="login consent", max_age="0", acr_values=f"x {ACR_MFA} {ACR_PASSWORD}",
                         resource=["https://api.example"], dpop_jkt="A" * 43, state="s"), CFG)
    assert ex.nonce == "n" and ex.prompt == {"login", "consent"} and ex.max_age == 0
    assert ex.acr == ACR_PASSWORD  # any listed class is acceptable: the weakest is required
    assert ex.resources == ("https://api.example",) and ex.dpop_jkt == "A" * 43 and ex.state == "s"


@pytest.mark.parametrize("params", [
    dl(prompt="none login"), dl(prompt="select_account"), dl(max_age="-1"), dl(max_age="1e3"),
    dl(acr_values="urn:unknown"), dl(nonce=""), dl(nonce="n" * 513), dl(state="s" * 2049),
    dl(dpop_jkt="short"), dl(response_mode="fragment"), dl(response_mode="form_post"), dl(request="eyJ..."),
    dl(resource="https://evil.example"), dl(resource="https://api.example#frag"), dl(resource="relative"),
    dl(nonce=["a", "b"]),
])
def test_extras_refused(params: dict[str, Any]) -> None:
    with pytest.raises(OAuth2Error):
        parse_extras(params, CFG)


def test_stronger() -> None:
    assert stronger(None, ACR_MFA) == ACR_MFA
    assert stronger(ACR_PHISHING_RESISTANT, ACR_MFA) == ACR_PHISHING_RESISTANT
    assert stronger(None, None) is None


def test_iss_and_state_appended_keeping_registered_query() -> None:
    loc = authorization_response("https://c.example/cb?x=1", "https://as.example", [("code", "abc")], "s t")
    assert loc == "https://c.example/cb?x=1&code=abc&state=s+t&iss=https%3A%2F%2Fas.example"
    err = authorization_response("https://c.example/cb", "https://as.example", [("error", "access_denied")], None)
    assert err == "https://c.example/cb?error=access_denied&iss=https%3A%2F%2Fas.example"


def _client(**kw: Any) -> Client:
    base: dict[str, Any] = {"client_id": "cl_1", "name": "<b>Evil & Co</b>", "tenant": "acme",
                            "auth_method": "none", "grant_types": ("authorization_code",),
                            "redirect_uris": ("https://c/cb",), "scopes": ("openid",)}
    return Client(**{**base, **kw})


LOGIN = LoginState("s", "u", "<script>x</script>", "acme", (), 0.0, ("pwd",), ACR_PASSWORD)


def test_consent_needed_for_third_party_or_other_tenant() -> None:
    assert consent_required(_client(), LOGIN)
    assert not consent_required(_client(first_party=True), LOGIN)
    assert consent_required(_client(first_party=True, tenant="globex"), LOGIN)


def test_consent_page_escapes_and_names_scopes() -> None:
    resp = consent_page(client=_client(), login=LOGIN, scopes=["projects:read", "<i>odd</i>"],
                        request_uri='urn:x"><script>', csrf="tok")
    body = resp.body.decode()
    assert "<script>" not in body and "<b>Evil" not in body and "<i>odd" not in body
    assert "&lt;b&gt;Evil &amp; Co&lt;/b&gt;" in body and "Read your projects" in body and "&lt;i&gt;odd" in body
    assert '<html lang="en">' in body and "<h1>" in body
    assert any(k == "content-security-policy" and "default-src 'none'" in v for k, v in resp.headers)
    assert describe("unknown:scope") == "unknown:scope"


def _route(**kw: Any) -> RouteConfig:
    return RouteConfig(name="r", path="/x", methods=["GET"], upstream="u", auth=["jwt"], **kw)


def _p(acr: str | None, auth_time: float | None, jkt: str | None = None) -> Principal:
    return Principal("sub", "acme", "jti", "jwt", frozenset(), acr=acr, auth_time=auth_time, cnf_jkt=jkt)


def test_step_up_acr() -> None:
    route = _route(acr_values=[ACR_MFA])
    assert step_up(route, _p(ACR_MFA, 0), 100) is None
    assert step_up(route, _p(ACR_PHISHING_RESISTANT, 0), 100) is None
    for weak in (ACR_PASSWORD, None, "urn:other"):
        p = step_up(route, _p(weak, 0), 100)
        assert p is not None and p.status == 401 and p.reason == "authz.acr_too_weak"
        header = dict(p.headers)[b"www-authenticate"].decode()
        assert header.startswith("Bearer ") and 'error="insufficient_user_authentication"' in header
        assert f'acr_values="{ACR_MFA}"' in header
    assert step_up(_route(acr_values=["urn:other"]), _p("urn:other", 0), 100) is None  # exact match


def test_step_up_max_age() -> None:
    route = _route(max_auth_age_seconds=60)
    assert step_up(route, _p(ACR_PASSWORD, 1000.0), 1060.0) is None
    p = step_up(route, _p(ACR_PASSWORD, 1000.0), 1061.0)
    assert p is not None and p.reason == "authz.auth_too_old"
    assert "max_age=60" in dict(p.headers)[b"www-authenticate"].decode()
    unknown = step_up(route, _p(ACR_PASSWORD, None), 1.0)
    assert unknown is not None
    dpop = step_up(route, _p(ACR_PASSWORD, None, "j" * 43), 1.0)
    assert dpop is not None and dict(dpop.headers)[b"www-authenticate"].startswith(b"DPoP ")
