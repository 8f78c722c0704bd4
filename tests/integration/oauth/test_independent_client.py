"""The whole browser flow driven by an independent client library (requests-oauth2client),
found by discovery: private_key_jwt client authentication (RFC 7523), PAR (RFC 9126),
PKCE, the RFC 9207 `iss` check, a DPoP-bound code and tokens (RFC 9449 §10), ID token
validation against the published JWKS, and a refresh that keeps the DPoP binding."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pyotp
import pytest
import requests
from jwskate import Jwk, JwkSet, SignedJwt
from requests_oauth2client import DPoPKey, OAuth2Client, PrivateKeyJwt

from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.identity import identity_of
from tests.integration.oauth.test_code_flow import REDIRECT, Browser, FlowEnv, make_flow_env


@pytest.fixture(scope="module")
def env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowEnv]:
    yield from make_flow_env(upstream, tmp_path_factory)


def test_par_private_key_jwt_dpop_code_flow_and_refresh(env: FlowEnv) -> None:
    key = Jwk.generate(alg="ES256", kid="partner-1")
    client, secret = env.ctx.clients.create_client(
        name="independent", tenant="acme", auth_method="private_key_jwt", require_par=True,
        grant_types=["authorization_code", "refresh_token"], redirect_uris=[REDIRECT],
        scopes=["openid", "profile", "projects:read", "offline_access"],
        jwks=json.dumps({"keys": [key.public_jwk().to_dict()]}), first_party=True)
    assert secret is None
    oc = OAuth2Client.from_discovery_endpoint(
        f"{env.issuer}/.well-known/openid-configuration", issuer=env.issuer,
        auth=PrivateKeyJwt(client.client_id, key), redirect_uri=REDIRECT, id_token_signed_response_alg="ES256",
        testing=True)  # `testing`: allow the loopback http issuer
    assert oc.pushed_authorization_request_endpoint == f"{env.issuer}/oauth2/par"
    dpop_key = DPoPKey.generate(alg="ES256")
    azr = oc.authorization_request(scope="openid profile projects:read offline_access", dpop_key=dpop_key)
    pushed = oc.pushed_authorization_request(azr)

    username = env.user("independent")
    secret_totp = pyotp.random_base32()
    user = identity_of(env.ctx).users.by_username(username)
    assert user is not None
    identity_of(env.ctx).users.enroll_totp(user.user_id, secret_totp)
    browser = Browser(env, username, totp=lambda: pyotp.TOTP(secret_totp).now())
    back = browser.authorize(pushed.uri)
    assert back.status_code in (302, 303), back.text[:300]
    callback = back.headers["location"]
    response = azr.validate_callback(callback)  # state and RFC 9207 `iss` checked by the library
    # validate=False: this library version cannot rebuild a DPoP token while validating the
    # ID token (TypeError on `_dpop_key`); the ID token is checked below with jwskate instead.
    tokens = oc.authorization_code(response, dpop_key=dpop_key, validate=False)
    assert tokens.token_type.lower() == "dpop"
    assert tokens.id_token is not None
    jwks = JwkSet(requests.get(f"{env.issuer}/oauth2/jwks", timeout=10).json())
    id_token = SignedJwt(str(tokens.id_token))
    assert id_token.verify_signature(jwks, alg="ES256")
    claims = id_token.claims
    assert claims["iss"] == env.issuer and claims["aud"] == client.client_id and claims["nonce"] == azr.nonce
    assert claims["sub"] and claims["exp"] > time.time()
    assert tokens.refresh_token
    api = oc.session.get(env.url("/v1/tenants/acme/projects"), auth=tokens, timeout=10)
    assert api.status_code == 200, api.text
    # The refreshed token stays bound to the same key (RFC 9449 §5).
    refreshed = oc.refresh_token(tokens)  # a DPoPToken: the library proves with its key
    assert refreshed.access_token != tokens.access_token and refreshed.token_type.lower() == "dpop"
    # RFC 9449 §5: a confidential client's refresh token is bound to its client
    # authentication, not to a DPoP key; the new access token is bound to the new key.
    other = DPoPKey.generate(alg="ES256")
    rebound = oc.token_request({"grant_type": "refresh_token", "refresh_token": refreshed.refresh_token},
                               dpop_key=other)
    assert SignedJwt(str(rebound.access_token)).claims["cnf"] == {"jkt": other.dpop_jkt}
    # ... but never without DPoP: the family stays sender-constrained.
    with pytest.raises(Exception, match="DPoP"):
        oc.token_request({"grant_type": "refresh_token", "refresh_token": rebound.refresh_token})


def test_public_client_dpop_refresh_is_bound_to_its_key(env: FlowEnv) -> None:
    """RFC 9449 §5: a public client's refresh token is bound to the DPoP key; another key,
    or none, is refused."""
    client, _ = env.ctx.clients.create_client(
        name="independent-spa", tenant="acme", auth_method="none", grant_types=["authorization_code", "refresh_token"],
        redirect_uris=[REDIRECT], scopes=["openid", "projects:read", "offline_access"], first_party=True)
    oc = OAuth2Client.from_discovery_endpoint(
        f"{env.issuer}/.well-known/openid-configuration", issuer=env.issuer, client_id=client.client_id,
        redirect_uri=REDIRECT, id_token_signed_response_alg="ES256", testing=True)
    dpop_key = DPoPKey.generate(alg="ES256")
    azr = oc.authorization_request(scope="openid projects:read offline_access", dpop_key=dpop_key)
    username = env.user("spa")
    secret_totp = pyotp.random_base32()
    users = identity_of(env.ctx).users
    user = users.by_username(username)
    assert user is not None
    users.enroll_totp(user.user_id, secret_totp)
    back = Browser(env, username, totp=lambda: pyotp.TOTP(secret_totp).now()).authorize(str(azr.uri))
    tokens = oc.authorization_code(azr.validate_callback(back.headers["location"]), dpop_key=dpop_key,
                                   validate=False)
    assert SignedJwt(str(tokens.access_token)).claims["cnf"] == {"jkt": dpop_key.dpop_jkt}
    other = DPoPKey.generate(alg="ES256")
    with pytest.raises(Exception, match=r"invalid_grant|DPoP"):
        oc.token_request({"grant_type": "refresh_token", "refresh_token": tokens.refresh_token,
                          "client_id": client.client_id}, dpop_key=other)
    with pytest.raises(Exception, match=r"invalid_grant|DPoP"):  # no proof at all
        oc.token_request({"grant_type": "refresh_token", "refresh_token": tokens.refresh_token,
                          "client_id": client.client_id})
    # The refusals spent nothing: the holder of the key still refreshes, bound to it.
    refreshed = oc.refresh_token(tokens)
    assert SignedJwt(str(refreshed.access_token)).claims["cnf"] == {"jkt": dpop_key.dpop_jkt}
