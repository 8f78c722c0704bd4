"""Shared setup for the policy tests: a small route table, principals, and a policy
directory written into a temporary folder."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from portcullis.exchange import Principal
from portcullis.policy.config import PolicyConfig
from portcullis.policy.engine import PolicyEngine
from portcullis.policy.mapping import generate_schema
from portcullis.policy.testing import RouteSpec

ROUTES = [
    RouteSpec("list_projects", "/v1/tenants/{tenant}/projects", ["GET", "POST"], "tenant"),
    RouteSpec("project", "/v1/tenants/{tenant}/projects/{id}", ["GET", "PUT", "DELETE"], "tenant"),
    RouteSpec("tenant_users", "/v1/tenants/{tenant}/admin/users", ["GET", "POST"], "tenant"),
    RouteSpec("invoices", "/v1/tenants/{tenant}/billing/invoices", ["GET"], "tenant"),
    RouteSpec("secrets", "/v1/tenants/{tenant}/secrets/{id}", ["GET"], "tenant"),
]

BASE_CFG: dict[str, Any] = {
    "roles": {
        "global": {
            "viewer": {"clearance": "internal"},
            "editor": {"inherits": ["viewer"], "clearance": "confidential"},
            "admin": {"inherits": ["editor"], "clearance": "restricted"},
        },
        "tenants": {"acme": {"auditor": {"inherits": ["viewer"], "clearance": "restricted"}}},
    },
    "action_groups": {"admin": ["tenant_users"], "billing": ["invoices"]},
    "resources": {
        "project": {"type": "Project", "id_param": "id", "owner": "projects"},
        "secrets": {"type": "Secret", "id_param": "id", "sensitivity": "restricted"},
    },
    "owner_sources": {"projects": {"kind": "table", "entries": {"p1": {"owner": "alice", "tenant": "acme"}}}},
    "business_hours": {"timezone": "Europe/Berlin", "start": "09:00", "end": "17:00"},
    "networks": {"office": ["10.0.0.0/8", "2001:db8::/32"]},
}

PERMIT_ALL = '@id("permit-all")\npermit (principal, action, resource);\n'
BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> float:
    """Epoch seconds of a Berlin local time like '2025-03-05 10:00' (a Wednesday)."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


WEDNESDAY_10 = at("2025-03-05 10:00")


def cfg(**overrides: Any) -> PolicyConfig:
    doc = {**BASE_CFG, **overrides}
    return PolicyConfig.model_validate(doc)


def write_dir(tmp: Path, policies: dict[str, str], c: PolicyConfig | None = None,
              schema: str | None = None) -> Path:
    """A policy dir with ``policies`` (file name -> text) and a schema (generated unless given)."""
    d = tmp / "policies"
    d.mkdir(exist_ok=True)
    for name, text in policies.items():
        (d / name).write_text(text)
    (d / "schema.cedarschema").write_text(schema if schema is not None else generate_schema(c or cfg(), ROUTES))
    return d


def engine(tmp: Path, policies: dict[str, str] | None = None, **overrides: Any) -> PolicyEngine:
    c = cfg(**overrides)
    d = write_dir(tmp, policies if policies is not None else {"ops.cedar": PERMIT_ALL}, c)
    return PolicyEngine(c, ROUTES, d)


def principal(subject: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("editor",),
              **kw: Any) -> Principal:
    base: dict[str, Any] = {"credential_id": "c1", "credential_kind": "jwt", "scopes": frozenset({"projects"})}
    base.update(kw)
    return Principal(subject=subject, tenant=tenant, roles=frozenset(roles), **base)
