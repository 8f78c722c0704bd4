"""The authorization server on PostgreSQL (``storage.url``), where nothing serializes
requests the way SQLite's write lock does: a representative set of the oauth suites,
run against fresh schemas of the shared server, plus races aimed at every single-use
check (concurrent requests, READ COMMITTED).

The whole oauth suite runs on PostgreSQL with ``PORTCULLIS_TEST_OAUTH_PG=1`` (see
conftest.py); this module does so by default. The imported ``test_*`` functions are
collected here again and get this module's fixtures (PostgreSQL). It skips, saying why, when the server is
not reachable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyotp
import pytest
import requests

from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.identity import identity_of
from portcullis.oauth.identity.passkeys import PasskeyError
from tests.integration.harness import find_audit_event
from tests.integration.oauth.conftest import AsEnv, make_as_env
from tests.integration.oauth.test_code_flow import Browser as FlowBrowser
from tests.integration.oauth.test_code_flow import (  # noqa: F401
    FlowEnv,
    code_flow,
    make_flow_env,
    raw_code,
    redeem,
    test_code_flow_with_pkce_by_requests_oauthlib,
    test_code_reuse_refused_and_revokes_its_tokens,
    test_concurrent_redemptions_one_wins,
    test_consent_shown_for_third_party_only_and_remembered,
    test_par_required_used_once_and_expires,
)
from tests.integration.oauth.test_login import (  # noqa: F401
    Browser,
    clock,
    new_user,
    test_lockout_is_reached_and_lifts_by_itself,
    test_password_and_totp_login_returns_to_the_page,
    test_recovery_code_works_once,
    test_totp_replay_is_refused,
)
from tests.integration.oauth.test_refresh_flow import (  # noqa: F401
    test_concurrent_refreshes_exactly_one_wins_and_family_revoked,
    test_rfc7009_revoke_refresh_token_revokes_family_and_introspection,
    test_rotation_by_requests_oauthlib,
)
from tests.integration.oauth.test_token_endpoint import (  # noqa: F401
    TokEnv,
    assertion,
    cc_form,
    make_tok_env,
    test_client_credentials_with_basic_issues_an_rfc9068_token,
    test_private_key_jwt_replay_is_refused,
    test_private_key_jwt_with_requests_oauth2client,
    test_revoked_client_is_refused_within_a_second,
)

pytestmark = pytest.mark.services

T = TypeVar("T")


@pytest.fixture(scope="module")
def as_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsEnv]:
    yield from make_as_env(upstream, tmp_path_factory, on_postgres=True)


@pytest.fixture(scope="module")
def flow_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowEnv]:
    yield from make_flow_env(upstream, tmp_path_factory, on_postgres=True)


@pytest.fixture(scope="module")
def tok_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokEnv]:
    yield from make_tok_env(upstream, tmp_path_factory, on_postgres=True)


def race(n: int, fn: Callable[[], T]) -> list[T]:
    """`fn` in `n` threads released at once; the results (in completion order)."""
    barrier = threading.Barrier(n)
    out: list[T] = []
    lock = threading.Lock()

    def go() -> None:
        barrier.wait()
        r = fn()
        with lock:
            out.append(r)

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == n
    return out


def test_runs_on_postgresql(as_env: AsEnv, flow_env: FlowEnv, tok_env: TokEnv) -> None:
    for ctx in (as_env.ctx, flow_env.ctx, tok_env.ctx):
        assert ctx.db.engine.dialect.name == "postgresql"


# --- races on the single-use checks ---

def test_concurrent_refreshes_many_one_wins(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("race8")
    _sess, token = code_flow(flow_env, FlowBrowser(flow_env, flow_env.user()), client.client_id)
    results = race(8, lambda: requests.post(flow_env.url("/oauth2/token"), timeout=20, data={
        "grant_type": "refresh_token", "client_id": client.client_id, "refresh_token": token["refresh_token"]}))
    assert sorted(r.status_code for r in results) == [200] + [400] * 7
    winner = next(r for r in results if r.status_code == 200).json()
    assert flow_env.wait_refused(winner["access_token"]).status_code == 401


def test_concurrent_code_redemptions_many_one_wins(flow_env: FlowEnv) -> None:
    client, _ = flow_env.client("coderace")
    code, verifier = raw_code(flow_env, FlowBrowser(flow_env, flow_env.user()), client.client_id)
    results = race(8, lambda: redeem(flow_env, client.client_id, code, verifier))
    assert sorted(r.status_code for r in results) == [200] + [400] * 7
    winner = next(r for r in results if r.status_code == 200).json()
    # The reuses revoke what the winner got.
    assert flow_env.wait_refused(winner["access_token"]).status_code == 401


def test_concurrent_private_key_jwt_replays_one_wins(tok_env: TokEnv) -> None:
    a = assertion(tok_env)
    results = race(8, lambda: tok_env.post("/oauth2/token", cc_form(tok_env, a)))
    assert sorted(r.status_code for r in results) == [200] + [401] * 7


def test_concurrent_totp_same_code_one_wins(as_env: AsEnv) -> None:
    name, secret = new_user(as_env, totp=True)
    users = identity_of(as_env.ctx).users
    user = users.by_username(name)
    assert user is not None and secret is not None
    code = pyotp.TOTP(secret).now()
    results = race(8, lambda: users.verify_totp(user.user_id, code))
    assert sorted(results) == ["ok"] + ["replay"] * 7


def test_concurrent_recovery_code_one_wins(as_env: AsEnv) -> None:
    name, _ = new_user(as_env, totp=True)
    users = identity_of(as_env.ctx).users
    user = users.by_username(name)
    assert user is not None
    codes = users.new_recovery_codes(user.user_id)
    assert sorted(race(8, lambda: users.use_recovery_code(user.user_id, codes[0]))) == [False] * 7 + [True]


def test_concurrent_recovery_code_replacements_leave_one_set(as_env: AsEnv) -> None:
    name, _ = new_user(as_env, totp=True)
    users = identity_of(as_env.ctx).users
    user = users.by_username(name)
    assert user is not None
    sets = race(4, lambda: users.new_recovery_codes(user.user_id))
    assert users.recovery_codes_left(user.user_id) == 10
    assert sum(users.use_recovery_code(user.user_id, s[0]) for s in sets) == 1


def test_concurrent_login_failures_all_count(as_env: AsEnv) -> None:
    """Lost updates would let a credential-stuffing burst count as one failure."""
    throttle = identity_of(as_env.ctx).throttle
    account = throttle.account_key(f"nobody-{id(throttle)}@acme.example")
    ip = throttle.ip_key("192.0.2.77")
    try:
        race(10, lambda: throttle.failure(account, ip))
        assert throttle.failures(account) == 10
        assert throttle.failures(ip) == 10
        assert not throttle.check(account, ip).allowed
    finally:
        throttle.clear(account)
        throttle.clear(ip)


def test_concurrent_wrong_passwords_over_http_are_throttled(as_env: AsEnv) -> None:
    t = as_env.ctx.cfg.login_throttle
    name, _ = new_user(as_env)
    throttle = identity_of(as_env.ctx).throttle
    try:
        results = race(6, lambda: Browser(as_env).login(name, "wrong wrong wrong wrong"))
        assert all(r.status_code in (401, 429) for r in results)
        wrong = sum(r.status_code == 401 for r in results)
        assert throttle.failures(throttle.account_key(name)) == wrong
        if wrong >= t.free_failures_per_account:
            r = Browser(as_env).login(name)  # the right password, but throttled now
            assert r.status_code == 429
            assert find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason in (
                "login.throttled", "login.locked")
    finally:
        throttle.clear(throttle.account_key(name))
        throttle.clear(throttle.ip_key("127.0.0.1"))


def test_concurrent_webauthn_challenge_taken_once(as_env: AsEnv) -> None:
    """The challenge of one ceremony is single use even when requests race for it."""
    passkeys = identity_of(as_env.ctx).passkeys
    passkeys.authentication_options("flow-race", None)

    def take() -> bool:
        try:
            passkeys._take_challenge("flow-race", "login")
        except PasskeyError:
            return False
        return True

    assert sorted(race(8, take)) == [False] * 7 + [True]
