"""RFC 9068 access token claims for users and clients, bindings from the current
request, RFC 8707 resource validation, and the token response shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from portcullis.credentials.acr import ACR_MFA
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.db import AuthDb
from portcullis.oauth.http import AsRequest
from portcullis.oauth.keys import Keyring
from portcullis.oauth.models import Client, LoginState
from portcullis.oauth.rfc9068 import (
    AccessTokenIssuer,
    InvalidTargetError,
    bind_request,
    current_request,
    validate_resources,
)
from portcullis.oauth.server import OAuthRequest

CFG = AuthServerConfig(issuer="https://as.example", resources=["https://api.example/v2"], tenant_claim="org")
CLIENT = Client(client_id="cl_1", name="app", tenant="acme", auth_method="client_secret_basic",
                grant_types=("authorization_code", "refresh_token"), redirect_uris=("https://app.example/cb",),
                scopes=("projects:read",))
USER = LoginState(session_id="s", user_id="u_42", username="alice", tenant="globex", roles=("tenant-admin",),
                  auth_time=1_799_999_000.0, amr=("pwd", "otp"), acr=ACR_MFA)


def keyset(ring: Keyring) -> KeySet:
    doc: Any = ring.jwks()
    return KeySet.import_key_set(doc)


def oauth_request() -> OAuthRequest:
    return OAuthRequest(AsRequest(method="POST", path="/oauth2/token", query={}, headers={}, body=b"",
                                  client_ip="127.0.0.1", scheme="https", host="as.example", issuer=CFG.issuer,
                                  request_id="r"))


@pytest.fixture
def issuer(tmp_path: Path) -> tuple[AccessTokenIssuer, Keyring]:
    ring = Keyring(CFG, AuthDb(tmp_path / "oauth.db"), tmp_path / "secrets", clock=lambda: 1_800_000_000.0)
    return AccessTokenIssuer(CFG, ring, clock=lambda: 1_800_000_000.0), ring


def decode(token: str, ring: Keyring) -> jwt.Token:
    return jwt.decode(token, keyset(ring), algorithms=["ES256"])


def test_user_token_carries_authentication_and_bindings(issuer: tuple[AccessTokenIssuer, Keyring]) -> None:
    gen, ring = issuer
    req = oauth_request()
    req.dpop_jkt = "j" * 43
    req.cert_x5t = "x" * 43
    req.resources = ["https://api.example/v2"]
    assert current_request() is None
    with bind_request(req):
        assert current_request() is req
        token = gen("authorization_code", CLIENT, USER, "projects:read", include_refresh_token=True)
    assert current_request() is None
    assert token["token_type"] == "DPoP" and token["refresh_token"].startswith("prt_")
    assert len(token["refresh_token"]) > 40 and token["scope"] == "projects:read"
    t = decode(token["access_token"], ring)
    assert t.header["typ"] == "at+jwt"
    c = t.claims
    assert c["sub"] == "u_42" and c["client_id"] == "cl_1" and c["org"] == "globex"
    assert c["aud"] == "https://api.example/v2"
    assert c["acr"] == ACR_MFA and c["amr"] == ["pwd", "otp"] and c["auth_time"] == 1_799_999_000
    assert c["roles"] == ["tenant-admin"]
    assert c["cnf"] == {"jkt": "j" * 43, "x5t#S256": "x" * 43}
    assert c["exp"] == c["iat"] + CFG.access_token_lifetime_seconds


def test_client_token_has_the_clients_tenant_and_no_refresh(issuer: tuple[AccessTokenIssuer, Keyring]) -> None:
    gen, ring = issuer
    token = gen("client_credentials", CLIENT, None, "", include_refresh_token=True)
    assert token["token_type"] == "Bearer" and "refresh_token" not in token and "scope" not in token
    c = decode(token["access_token"], ring).claims
    assert c["sub"] == "cl_1" and c["org"] == "acme" and c["aud"] == CFG.issuer
    assert not {"acr", "amr", "roles", "cnf", "scope"} & set(c)


def test_shorter_lifetime_is_honoured_longer_is_not(issuer: tuple[AccessTokenIssuer, Keyring]) -> None:
    gen, _ = issuer
    assert gen("client_credentials", CLIENT, expires_in=60)["expires_in"] == 60
    assert gen("client_credentials", CLIENT, expires_in=86400)["expires_in"] == CFG.access_token_lifetime_seconds


def test_two_tokens_have_distinct_ids(issuer: tuple[AccessTokenIssuer, Keyring]) -> None:
    gen, ring = issuer
    a, b = (decode(gen("client_credentials", CLIENT)["access_token"], ring).claims["jti"] for _ in range(2))
    assert a != b


def test_resources() -> None:
    assert validate_resources(CFG, []) == []
    assert validate_resources(CFG, [CFG.issuer, "https://api.example/v2", CFG.issuer]) == [
        CFG.issuer, "https://api.example/v2"]
    for bad in (["https://api.example/v3"], ["/relative"], ["https://api.example/v2#x"], ["urn:x"],
                [CFG.issuer] * 11):
        with pytest.raises(InvalidTargetError):
            validate_resources(CFG, bad)
