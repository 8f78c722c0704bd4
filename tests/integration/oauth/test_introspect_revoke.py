"""Introspection (RFC 7662) and revocation (RFC 7009) over real HTTP."""

from __future__ import annotations

import time
import uuid

import jwskate
import requests
from requests_oauth2client import DPoPKey

from portcullis.oauth import tokens
from tests.integration.oauth.test_token_endpoint import TokEnv, basic, oauth_client, tok_env

__all__ = ["tok_env"]


def creds(env: TokEnv, name: str) -> tuple[str, str]:
    reg = env.clients[name]
    assert reg.secret is not None
    return reg.client.client_id, reg.secret


def cc_token(env: TokEnv, name: str = "basic") -> str:
    return str(oauth_client(env.token_url, basic(env, name)).client_credentials().access_token)


def introspect(env: TokEnv, token: str, who: str = "basic") -> requests.Response:
    return env.post("/oauth2/introspect", {"token": token}, auth=creds(env, who))


def test_active_token_is_described(tok_env: TokEnv) -> None:
    token = cc_token(tok_env)
    r = introspect(tok_env, token)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    doc = r.json()
    claims = tok_env.decode(token).claims
    assert doc["active"] is True and doc["token_type"] == "Bearer"
    for k in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope", "tenant"):
        assert doc[k] == claims[k]


def test_a_client_of_the_same_tenant_may_introspect(tok_env: TokEnv) -> None:
    r = tok_env.post("/oauth2/introspect", {"token": cc_token(tok_env)},
                     auth=(tok_env.clients["post"].client.client_id, "x"))
    assert r.status_code == 401  # post client: secret in the body only, and this one is wrong
    reg = tok_env.clients["post"]
    r = tok_env.post("/oauth2/introspect", {"token": cc_token(tok_env), "client_id": reg.client.client_id,
                                            "client_secret": reg.secret or ""})
    assert r.json()["active"] is True


def test_other_tenant_learns_only_inactive(tok_env: TokEnv) -> None:
    r = introspect(tok_env, cc_token(tok_env), who="globex")
    assert r.status_code == 200 and r.json() == {"active": False}


def test_unauthenticated_caller_is_refused(tok_env: TokEnv) -> None:
    token = cc_token(tok_env)
    r = tok_env.post("/oauth2/introspect", {"token": token})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert "active" not in r.text and token not in r.text
    r = tok_env.post("/oauth2/introspect", {"token": token}, auth=(creds(tok_env, "basic")[0], "wrong"))
    assert r.status_code == 401 and tok_env.reason(r) == "oauth.client_auth.bad_secret"


def test_unknown_forged_and_malformed_tokens_are_inactive(tok_env: TokEnv) -> None:
    now = int(time.time())
    cid = creds(tok_env, "basic")[0]
    kid = tokens.keyring(tok_env.ctx).current_kid()
    forged = jwskate.Jwt.sign({"iss": tok_env.issuer, "sub": cid, "client_id": cid, "tenant": "acme", "exp": now + 60,
                               "jti": "f"}, key=jwskate.Jwk.generate(alg="ES256", kid=kid), alg="ES256", typ="at+jwt")
    expired = tok_env.ctx.require_keys().sign({"iss": tok_env.issuer, "sub": cid, "client_id": cid,
                                               "tenant": "acme", "exp": now - 1, "jti": "e"}, "at+jwt")
    id_token_like = tok_env.ctx.require_keys().sign({"iss": tok_env.issuer, "sub": cid, "client_id": cid,
                                                     "tenant": "acme", "exp": now + 60, "jti": "i"}, "JWT")
    for t in (str(forged), expired, id_token_like, "opaque-thing", "a.b.c", "x" * 9000):
        r = introspect(tok_env, t)
        assert r.status_code == 200 and r.json() == {"active": False}, t[:40]
    r = tok_env.post("/oauth2/introspect", {}, auth=creds(tok_env, "basic"))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_dpop_bound_token_introspects_with_its_binding(tok_env: TokEnv) -> None:
    key = DPoPKey.generate(alg="ES256")
    tok = oauth_client(tok_env.token_url, basic(tok_env)).client_credentials(dpop_key=key)
    doc = introspect(tok_env, tok.access_token).json()
    assert doc["active"] is True and doc["token_type"] == "DPoP" and doc["cnf"] == {"jkt": key.dpop_jkt}


def test_revocation(tok_env: TokEnv) -> None:
    token = cc_token(tok_env)
    # Another client's attempt is a quiet no-op (no oracle), and the token stays active.
    r = tok_env.post("/oauth2/revoke", {"token": token}, auth=creds(tok_env, "globex"))
    assert r.status_code == 200
    assert introspect(tok_env, token).json()["active"] is True
    # Unauthenticated: refused, nothing revoked.
    assert tok_env.post("/oauth2/revoke", {"token": token}).status_code == 401
    assert introspect(tok_env, token).json()["active"] is True
    # The owner revokes it; unknown tokens are a 200 too (RFC 7009 §2.2).
    assert tok_env.post("/oauth2/revoke", {"token": token}, auth=creds(tok_env, "basic")).status_code == 200
    assert introspect(tok_env, token).json() == {"active": False}
    r = tok_env.post("/oauth2/revoke", {"token": str(uuid.uuid4()), "token_type_hint": "refresh_token"},
                     auth=creds(tok_env, "basic"))
    assert r.status_code == 200
    r = tok_env.post("/oauth2/revoke", {"token": "whatever", "token_type_hint": "something_else"},
                     auth=creds(tok_env, "basic"))
    assert r.status_code == 200
