"""The request -> Cedar mapping."""

from __future__ import annotations

import json
from pathlib import Path

import cedarpy

from portcullis.policy.mapping import RequestMapper, generate_schema, principal_type

from .helpers import ROUTES, WEDNESDAY_10, at, cfg, principal


def test_principal_resource_and_context() -> None:
    m = RequestMapper(cfg(risk_threshold=50), ROUTES)
    p = principal(roles=("editor", "bogus", "a/b"), acr="urn:portcullis:acr:mfa", amr=("pwd", "otp", "mfa"),
                  cnf_jkt="jkt", auth_time=WEDNESDAY_10 - 125)
    inp = m.build(p, route="project", method="put", path_params={"tenant": "acme", "id": "p9"},
                  client_ip="10.2.3.4", now=WEDNESDAY_10, risk_score=60, country="DE")
    pe, re_ = inp.entities
    assert inp.principal == {"type": "User", "id": "acme/alice"}
    assert pe["attrs"]["roles"] == ["bogus", "editor", "viewer"]  # "a/b" dropped
    assert pe["attrs"]["clearance"] == 2 and pe["attrs"]["clearance_label"] == "confidential"
    assert [x["id"] for x in pe["parents"]] == ["bogus", "editor"]
    assert inp.resource == {"type": "Project", "id": "p9"}
    assert re_["attrs"] == {"owned": True, "sensitivity": 1, "label": "internal", "tenant": "acme",
                            "path_tenant": "acme"}  # no owner known
    c = inp.context
    assert (c["method"], c["write"], c["hour"], c["minute"], c["weekday"]) == ("PUT", True, 10, 0, 3)
    assert c["business_hours"] and c["networks"] == ["office"] and c["country"] == "DE"
    assert c["mfa"] and not c["phishing_resistant"] and c["dpop_bound"] and not c["mtls_bound"]
    assert c["auth_age_minutes"] == 2 and c["risk_score"] == 60 and c["high_risk"]


def test_clients_routes_and_networks() -> None:
    m = RequestMapper(cfg(), ROUTES)
    key = principal(subject="k1", roles=(), credential_kind="api_key")
    assert principal_type(key) == "Client"
    assert principal_type(principal(subject="svc", client_id="svc")) == "Client"
    assert principal_type(principal(subject="alice", client_id="app")) == "User"
    inp = m.build(key, route="list_projects", method="GET", path_params={"tenant": "acme"},
                  client_ip="2001:db8::1", now=at("2025-03-08 10:00"))
    assert inp.resource == {"type": "Route", "id": "list_projects"}
    assert inp.context["networks"] == ["office"] and not inp.context["business_hours"]
    assert "auth_age_minutes" not in inp.context and "country" not in inp.context
    assert m.networks_of("not-an-ip") == [] and m.networks_of("192.0.2.1") == []


def test_key_has_minute_granularity() -> None:
    m = RequestMapper(cfg(), ROUTES)
    def key(t: float) -> str:
        return m.build(principal(), route="list_projects", method="GET", path_params={"tenant": "acme"},
                       client_ip="10.0.0.1", now=t).key
    assert key(WEDNESDAY_10) == key(WEDNESDAY_10 + 59)
    assert key(WEDNESDAY_10) != key(WEDNESDAY_10 + 60)


def test_generated_schema_is_valid_and_complete(tmp_path: Path) -> None:
    text = generate_schema(cfg(), ROUTES)
    schema = cedarpy.Schema.from_str(text)
    for r in ROUTES:
        assert f'action "{r.name}"' in str(schema)
    assert 'action "tenant_users" in ["admin"]' in text
    # The mapping's output fits it exactly.
    m = RequestMapper(cfg(), ROUTES)
    inp = m.build(principal(), route="secrets", method="GET", path_params={"tenant": "acme", "id": "s"},
                  client_ip="1.2.3.4", now=0)
    cedarpy.Entities.from_json_str(json.dumps(list(inp.entities) + m.role_entities()), schema)
