"""Our `OAuthRequest` stands in for Authlib's `OAuth2Request` without calling its
__init__ (which re-checks transport security per request): it must carry every
attribute Authlib's own constructor sets, so a new Authlib version that adds one fails
here rather than at run time."""

from __future__ import annotations

from authlib.oauth2.rfc6749 import OAuth2Request

from portcullis.oauth.http import AsRequest
from portcullis.oauth.server import OAuthRequest


def _req(query: dict[str, list[str]] | None = None) -> AsRequest:
    return AsRequest(method="POST", path="/oauth2/token", query=query or {},
                     headers={"content-type": "application/x-www-form-urlencoded"},
                     body=b"grant_type=client_credentials&scope=a", client_ip="127.0.0.1", scheme="https",
                     host="as.example", issuer="https://as.example", request_id="r")


def test_oauth_request_sets_every_attribute_authlib_sets() -> None:
    authlib_attrs = set(vars(OAuth2Request("POST", "https://as.example/oauth2/token", headers={})))
    ours = OAuthRequest(_req())
    missing = authlib_attrs - set(vars(ours))
    assert not missing, f"Authlib's OAuth2Request sets attributes we do not: {sorted(missing)}"
    assert ours.uri == "https://as.example/oauth2/token"
    assert ours.payload.grant_type == "client_credentials"
    assert ours.payload.scope == "a"
    assert ours.client is None and ours.user is None
