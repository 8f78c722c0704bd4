"""The authorization server's stage: mounted paths answered, others passed on, bounds."""

from __future__ import annotations

from tests.integration.harness import find_audit_event
from tests.integration.oauth.conftest import AsEnv


def test_unmounted_paths_still_reach_routes(as_env: AsEnv) -> None:
    r = as_env.client.request("GET", "/v1/health")
    assert r.status == 200


def test_unknown_oauth_path_is_not_routed_upstream(as_env: AsEnv) -> None:
    r = as_env.client.request("GET", "/oauth2/nothing-here")
    assert r.status == 404
    assert r.headers["content-type"] == "application/problem+json"
    event = find_audit_event(as_env.gateway, r.headers["x-request-id"])
    assert event.decision == "deny"
