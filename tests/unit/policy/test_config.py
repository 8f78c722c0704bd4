"""PolicyConfig: unknown keys and bad references are errors that name their path."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from portcullis.policy.config import PolicyConfig


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        PolicyConfig.model_validate(doc)
    return [".".join(str(x) for x in e["loc"]) + ": " + e["msg"] for e in info.value.errors()]


def test_defaults() -> None:
    c = PolicyConfig()
    assert c.library == [] and c.decision_cache_size == 10_000 and c.business_hours.timezone == "UTC"


def test_unknown_key_is_located() -> None:
    errs = errors({"roles": {"global": {"admin": {"inherit": ["x"]}}}})
    assert any(e.startswith("roles.global.admin.inherit:") for e in errs), errs


def test_role_graph_errors() -> None:
    errs = errors({"roles": {"global": {"admin": {"inherits": ["edtor"]}}}})
    assert any("global.admin.inherits: unknown global role 'edtor'" in e for e in errs), errs
    errs = errors({"roles": {"global": {"a": {"inherits": ["b"]}, "b": {"inherits": ["a"]}}}})
    assert any("cycle: a -> b -> a" in e for e in errs), errs
    errs = errors({"roles": {"tenants": {"acme": {"x": {"inherits": ["ghost"]}}}}})
    assert any("tenants.acme.x.inherits: unknown role 'ghost'" in e for e in errs), errs
    errs = errors({"roles": {"global": {"acme/admin": {}}}})
    assert any("roles.global" in e for e in errs), errs


def test_business_hours_validation() -> None:
    assert any("business_hours.timezone" in e for e in errors({"business_hours": {"timezone": "Mars/Base"}}))
    assert any("end must be after start" in e for e in errors({"business_hours": {"start": "18:00", "end": "09:00"}}))
    assert any("business_hours.days.0" in e for e in errors({"business_hours": {"days": ["funday"]}}))


def test_networks_and_library() -> None:
    errs = errors({"networks": {"office": ["10.0.0.1/8"]}})
    assert any(e.startswith("networks:") and "office[0]" in e for e in errs), errs
    assert any(e.startswith("library.0:") for e in errors({"library": ["tenant_isolaton"]}))
    errs = errors({"library": ["admin_business_hours"]})
    assert any("declare action_groups.admin" in e for e in errs), errs


def test_resource_and_owner_references() -> None:
    errs = errors({"resources": {"project": {"type": "Project", "id_param": "id", "owner": "nowhere"}}})
    assert any("resources.project.owner: unknown owner source 'nowhere'" in e for e in errs), errs
    assert any("resources.project.type" in e for e in errors({"resources": {"project": {"type": "User"}}}))
    errs = errors({"owner_sources": {"o": {"kind": "upstream", "url": "http://owners.example/{id}"}}})
    assert any("owner_sources.o.upstream.url" in e and "https" in e for e in errs), errs
    errs = errors({"owner_sources": {"o": {"kind": "upstream", "url": "https://{tenant}.example/{id}"}}})
    assert any("host" in e for e in errs), errs
    errs = errors({"owner_sources": {"o": {"kind": "table", "sqlite": "a.db", "file": "b.yaml"}}})
    assert any("exactly one of" in e for e in errs), errs
