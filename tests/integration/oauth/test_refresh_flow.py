"""Refresh tokens end to end: rotation by requests-oauthlib, reuse detection, concurrent
refreshes over real HTTP, idle and absolute lifetimes (the server's clock shifted),
scope narrowing, RFC 7009 revocation and RFC 7662 introspection of refresh tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from portcullis.demo.upstream import UpstreamThread
from tests.integration.oauth.test_code_flow import Browser, FlowEnv, code_flow, make_flow_env


@pytest.fixture(scope="module")
def flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowEnv]:
    yield from make_flow_env(upstream, tmp_path_factory)

def _refresh(env: FlowEnv, client_id: str, token: str, **extra: str) -> requests.Response:
    return requests.post(env.url("/oauth2/token"), timeout=10,
                         data={"grant_type": "refresh_token", "client_id": client_id, "refresh_token": token, **extra})


def test_rotation_by_requests_oauthlib(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("rot")
    sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    new = sess.refresh_token(flow_env.url("/oauth2/token"), client_id=client.client_id)
    assert new["refresh_token"] != token["refresh_token"] and new["refresh_token"].startswith("prt_")
    assert flow_env.api(new["access_token"]).status_code == 200
    assert "id_token" in new  # OIDC Core §12.2
    # The old one is spent: presenting it again revokes the whole family.
    reuse = _refresh(flow_env, client.client_id, token["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert flow_env.wait_refused(new["access_token"]).status_code == 401
    assert flow_env.wait_refused(token["access_token"]).status_code == 401
    assert _refresh(flow_env, client.client_id, new["refresh_token"]).json()["error"] == "invalid_grant"


def test_concurrent_refreshes_exactly_one_wins_and_family_revoked(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("race")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    barrier = threading.Barrier(2)
    results: list[requests.Response] = []

    def go() -> None:
        barrier.wait()
        results.append(_refresh(flow_env, client.client_id, token["refresh_token"]))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 400]
    winner = next(r for r in results if r.status_code == 200).json()
    # The loser was a reuse: the family is revoked, the winner's tokens too.
    assert flow_env.wait_refused(winner["access_token"]).status_code == 401
    assert _refresh(flow_env, client.client_id, winner["refresh_token"]).json()["error"] == "invalid_grant"


def test_idle_lifetime(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("idle")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    undo = flow_env.shifted_clock(flow_env.ctx.cfg.refresh_idle_seconds + 1)
    try:
        r = _refresh(flow_env, client.client_id, token["refresh_token"])
    finally:
        undo()
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_absolute_lifetime_from_family_start(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("abs")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    rt = token["refresh_token"]
    idle, absolute = flow_env.ctx.cfg.refresh_idle_seconds, flow_env.ctx.cfg.refresh_absolute_seconds
    step = idle - 50
    shift = 0
    try:
        while shift + step < absolute:
            shift += step
            flow_env.shifted_clock(shift)
            r = _refresh(flow_env, client.client_id, rt)
            assert r.status_code == 200, (shift, r.text)
            rt = r.json()["refresh_token"]
        flow_env.shifted_clock(absolute + 1)
        r = _refresh(flow_env, client.client_id, rt)  # used within idle, but the family is too old
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    finally:
        flow_env.restore_clock()


def test_scope_may_only_narrow(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("narrow")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id,
                             scope=["offline_access", "openid", "projects:read"])
    wider = _refresh(flow_env, client.client_id, token["refresh_token"], scope="projects:read billing:read")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrow = _refresh(flow_env, client.client_id, token["refresh_token"], scope="projects:read")
    assert narrow.status_code == 200, narrow.text
    assert narrow.json()["scope"] == "projects:read"
    assert "id_token" not in narrow.json()


def test_no_refresh_token_without_offline_access_or_grant(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("nooffline")
    _s, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id,
                          scope=["openid", "projects:read"])
    assert "refresh_token" not in token
    nogrant, _ = flow_env.client("nogrant", grants=("authorization_code",))
    _s, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), nogrant.client_id)
    assert "refresh_token" not in token


def test_refresh_keeps_original_login_facts(flow_env: FlowEnv) -> None:
    from joserfc import jwt
    from joserfc.jwk import KeySet

    client, _ = flow_env.client("facts")
    _s, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    new = _refresh(flow_env, client.client_id, token["refresh_token"]).json()
    keys = KeySet.import_key_set(requests.get(flow_env.url("/oauth2/jwks"), timeout=10).json())
    a = jwt.decode(token["access_token"], keys).claims
    b = jwt.decode(new["access_token"], keys).claims
    assert (a["auth_time"], a["acr"], a["amr"], a["sub"]) == (b["auth_time"], b["acr"], b["amr"], b["sub"])


def test_rfc7009_revoke_refresh_token_revokes_family_and_introspection(flow_env: FlowEnv) -> None:
    client, secret = flow_env.client("conf", auth="client_secret_basic")
    assert secret is not None
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id, secret=secret)
    intro = requests.post(flow_env.url("/oauth2/introspect"), auth=(client.client_id, secret), timeout=10,
                          data={"token": token["refresh_token"]})
    assert intro.status_code == 200
    assert intro.json()["active"] is True and intro.json()["token_type"] == "refresh_token"
    r = requests.post(flow_env.url("/oauth2/revoke"), auth=(client.client_id, secret), timeout=10,
                      data={"token": token["refresh_token"], "token_type_hint": "refresh_token"})
    assert r.status_code == 200
    assert flow_env.wait_refused(token["access_token"]).status_code == 401
    intro = requests.post(flow_env.url("/oauth2/introspect"), auth=(client.client_id, secret), timeout=10,
                          data={"token": token["refresh_token"]})
    assert intro.json() == {"active": False}


def test_operator_revocation_of_subject_or_client_stops_refresh_too(flow_env: FlowEnv) -> None:
    """`portcullis tokens revoke --sub/--client` stops refresh tokens as well as access tokens."""
    import time

    from portcullis.storage.protocols import RevocationRecord

    client, _ = flow_env.client("oprev")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), client.client_id)
    sub = flow_env.decode_sub(token["access_token"])
    flow_env.ctx.revocations.revoke_tokens(RevocationRecord("sub", sub, time.time(), None, "test"))
    r = _refresh(flow_env, client.client_id, token["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"

    other, _ = flow_env.client("oprev-client")
    _sess, token = code_flow(flow_env, Browser(flow_env, flow_env.user()), other.client_id)
    flow_env.ctx.revocations.revoke_tokens(RevocationRecord("client", other.client_id, time.time(), None, "test"))
    r = _refresh(flow_env, other.client_id, token["refresh_token"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
