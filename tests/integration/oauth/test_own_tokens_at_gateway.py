"""The gateway trusts its own authorization server: the tokens it issues open the demo
routes (with tenant isolation, DPoP and certificate binding enforced), a revoked token is
refused within a second, a rotated key works at once, and look-alikes are refused."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwskate
import requests
from requests_oauth2client import DPoPKey

from portcullis.oauth import tokens
from tests.integration.harness import find_audit_event
from tests.integration.oauth.test_token_endpoint import TokEnv, basic, oauth_client, tok_env

__all__ = ["tok_env"]


def cc_token(env: TokEnv, name: str = "basic", **kw: Any) -> str:
    return str(oauth_client(env.token_url, basic(env, name)).client_credentials(**kw).access_token)


def get(env: TokEnv, path: str, token: str, scheme: str = "Bearer") -> requests.Response:
    return requests.get(env.issuer + path, headers={"Authorization": f"{scheme} {token}"}, timeout=10)


ACME = "/v1/tenants/acme/projects"


def test_issued_token_opens_the_route_of_its_tenant_only(tok_env: TokEnv) -> None:
    token = cc_token(tok_env, scope="projects:read")
    r = get(tok_env, ACME, token)
    assert r.status_code == 200, r.text
    event = find_audit_event(tok_env.gateway, r.headers["x-request-id"])
    assert event.decision == "allow"
    assert get(tok_env, "/v1/tenants/globex/projects", token).status_code == 403
    # A scope the token does not carry.
    assert get(tok_env, "/v1/tenants/acme/invoices", token).status_code == 403


def test_revoked_token_is_refused_within_a_second(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    token = cc_token(tok_env)
    assert get(tok_env, ACME, token).status_code == 200
    r = tok_env.post("/oauth2/revoke", {"token": token, "token_type_hint": "access_token"},
                     auth=(reg.client.client_id, reg.secret or ""))
    assert r.status_code == 200
    start = time.monotonic()
    while get(tok_env, ACME, token).status_code == 200:
        assert time.monotonic() - start < 1.0, "still accepted a second after revocation"
        time.sleep(0.05)
    r = get(tok_env, ACME, token)
    assert r.status_code == 401
    assert find_audit_event(tok_env.gateway, r.headers["x-request-id"]).reason == "jwt.revoked_token"
    assert get(tok_env, ACME, cc_token(tok_env)).status_code == 200  # only that token


def test_dpop_bound_token_needs_its_proof(tok_env: TokEnv) -> None:
    key = DPoPKey.generate(alg="ES256")
    tok = oauth_client(tok_env.token_url, basic(tok_env)).client_credentials(dpop_key=key)
    r = requests.get(tok_env.issuer + ACME, auth=tok, timeout=10)  # requests-oauth2client adds the proof
    assert r.status_code == 200, r.text
    r = get(tok_env, ACME, tok.access_token)  # the same token as a bearer token
    assert r.status_code == 401
    assert find_audit_event(tok_env.gateway, r.headers["x-request-id"]).reason == "auth.dpop_required"


def test_certificate_bound_token_needs_its_certificate(tok_env: TokEnv) -> None:
    cid = tok_env.clients["tls"].client.client_id
    alice = tok_env.pki.clients["alice"][0].read_bytes()
    mallory = tok_env.pki.clients["mallory"][0].read_bytes()
    _, _, body = tok_env.via_proxy("/oauth2/token", {"grant_type": "client_credentials", "client_id": cid}, alice)
    token = json.loads(body)["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert tok_env.via_proxy(ACME, {}, alice, method="GET", headers=auth)[0] == 200
    assert tok_env.via_proxy(ACME, {}, mallory, method="GET", headers=auth)[0] == 401
    status, headers, _ = tok_env.via_proxy(ACME, {}, None, method="GET", headers=auth)
    assert status == 401
    assert find_audit_event(tok_env.gateway, headers["x-request-id"]).reason == "auth.cert_required"


def test_rotated_key_works_at_once_and_old_tokens_still_do(tok_env: TokEnv) -> None:
    before = cc_token(tok_env)
    assert get(tok_env, ACME, before).status_code == 200
    new_kid = tokens.keyring(tok_env.ctx).rotate()
    after = cc_token(tok_env)
    assert tok_env.decode(after).header["kid"] == new_kid
    assert get(tok_env, ACME, after).status_code == 200
    assert get(tok_env, ACME, before).status_code == 200


def _claims(env: TokEnv) -> dict[str, Any]:
    reg = env.clients["basic"]
    now = int(time.time())
    return {"iss": env.issuer, "sub": reg.client.client_id, "aud": env.issuer, "exp": now + 300, "iat": now,
            "jti": str(uuid.uuid4()), "client_id": reg.client.client_id, "scope": "projects:read", "tenant": "acme"}


def test_look_alike_tokens_are_refused(tok_env: TokEnv) -> None:
    kid = tokens.keyring(tok_env.ctx).current_kid()
    forged = jwskate.Jwt.sign(_claims(tok_env), key=jwskate.Jwk.generate(alg="ES256", kid=kid), alg="ES256",
                              typ="at+jwt")
    assert get(tok_env, ACME, str(forged)).status_code == 401
    # Signed by our key, but not typed as an access token (e.g. an ID token, RFC 9068 §4).
    not_at = tok_env.ctx.require_keys().sign(_claims(tok_env), "JWT")
    r = get(tok_env, ACME, not_at)
    assert r.status_code == 401
    assert find_audit_event(tok_env.gateway, r.headers["x-request-id"]).reason == "jwt.bad_typ"
    # Signed by our key for another audience.
    other_aud = tok_env.ctx.require_keys().sign({**_claims(tok_env), "aud": "https://elsewhere.example"}, "at+jwt")
    assert get(tok_env, ACME, other_aud).status_code == 401
    assert get(tok_env, ACME, tok_env.ctx.require_keys().sign(_claims(tok_env), "at+jwt")).status_code == 200
