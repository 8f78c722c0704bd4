"""The ``policy:`` section of the gateway config (issue 5): Cedar policies, RBAC roles,
resources, owner sources, business hours and named networks.

Every model forbids unknown keys. Cross-references (a role inheriting an unknown role,
a resource naming an unknown owner source, a library policy whose action group is not
declared) are checked here and reported with the exact path of the offending value.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.tz import iana_zone

Sensitivity = Literal["public", "internal", "confidential", "restricted"]
#: Labels as Cedar numbers: a principal whose clearance is at least a resource's label may see it.
SENSITIVITY_LEVELS: dict[str, int] = {"public": 0, "internal": 1, "confidential": 2, "restricted": 3}

LibraryPolicy = Literal[
    "tenant_isolation",
    "owner_only_writes",
    "admin_business_hours",
    "phishing_resistant_billing",
    "block_high_risk",
    "sensitivity_clearance",
]
LIBRARY_POLICIES: tuple[str, ...] = (
    "tenant_isolation", "owner_only_writes", "admin_business_hours",
    "phishing_resistant_billing", "block_high_risk", "sensitivity_clearance",
)
#: Action groups a shipped policy relies on; enabling the policy requires the group.
LIBRARY_GROUPS: dict[str, str] = {"admin_business_hours": "admin", "phishing_resistant_billing": "billing"}

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WORKWEEK: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri")

_NAME = r"^[A-Za-z0-9_.:-]+$"  # route names, as RouteConfig.name
_ROLE = r"^[A-Za-z0-9_.:-]{1,100}$"  # no '/': tenant roles are '<tenant>/<role>' in Cedar
_CEDAR_TYPE = r"^[A-Z][A-Za-z0-9_]{0,63}$"
_RESERVED_TYPES = frozenset({"User", "Client", "Role", "Route", "Action", "Context"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleConfig(_Model):
    """One role: the roles it inherits (their permissions and clearance) and its own clearance."""

    inherits: list[Annotated[str, Field(pattern=_ROLE)]] = Field(default_factory=list)
    clearance: Sensitivity | None = None


class RolesConfig(_Model):
    """RBAC roles. ``global`` roles exist in every tenant; a tenant's roles may inherit
    its own roles or global ones, and shadow a global role of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    global_: dict[Annotated[str, Field(pattern=_ROLE)], RoleConfig] = Field(default_factory=dict, alias="global")
    tenants: dict[Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^/]+$")],
                  dict[Annotated[str, Field(pattern=_ROLE)], RoleConfig]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _graph(self) -> RolesConfig:
        errors: list[str] = []
        for name, role in self.global_.items():
            for parent in role.inherits:
                if parent not in self.global_:
                    errors.append(f"global.{name}.inherits: unknown global role {parent!r}")
        for tenant, roles in self.tenants.items():
            for name, role in roles.items():
                for parent in role.inherits:
                    if parent not in roles and parent not in self.global_:
                        errors.append(f"tenants.{tenant}.{name}.inherits: unknown role {parent!r}")
        if errors:
            raise ValueError("; ".join(errors))
        # Cycles: depth-first over (scope, name) nodes.
        def node_parents(scope: str | None, name: str) -> list[tuple[str | None, str]]:
            roles = self.global_ if scope is None else self.tenants[scope]
            out: list[tuple[str | None, str]] = []
            for p in roles[name].inherits:
                out.append((scope, p) if scope is not None and p in roles else (None, p))
            return out

        state: dict[tuple[str | None, str], int] = {}

        def visit(n: tuple[str | None, str], path: list[str]) -> None:
            if state.get(n) == 2:
                return
            label = n[1] if n[0] is None else f"{n[0]}/{n[1]}"
            if state.get(n) == 1:
                raise ValueError(f"role inheritance cycle: {' -> '.join([*path, label])}")
            state[n] = 1
            for p in node_parents(*n):
                visit(p, [*path, label])
            state[n] = 2

        for name in self.global_:
            visit((None, name), [])
        for tenant, roles in self.tenants.items():
            for name in roles:
                visit((tenant, name), [])
        return self


class BusinessHours(_Model):
    """When admin actions are allowed: local time in ``timezone``, on ``days``, from
    ``start`` (inclusive) to ``end`` (exclusive), at minute granularity."""

    timezone: str = "UTC"
    days: list[Weekday] = Field(default_factory=lambda: list(_WORKWEEK), min_length=1)
    start: time = time(9, 0)
    end: time = time(17, 0)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return iana_zone(v)

    @field_validator("start", "end")
    @classmethod
    def _minute(cls, v: time) -> time:
        if v.second or v.microsecond or v.tzinfo is not None:
            raise ValueError("give a local time as HH:MM")
        return v

    @model_validator(mode="after")
    def _order(self) -> BusinessHours:
        if self.end <= self.start:
            raise ValueError("end must be after start (hours that cross midnight are not supported)")
        return self


class OwnerEntry(_Model):
    """Who owns one resource."""

    owner: str = Field(min_length=1, max_length=256)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)


class TableOwnerSourceConfig(_Model):
    """Owners from a table: a SQLite database table, or a static map in YAML (inline
    ``entries`` or a ``file`` of ``{resource_id: {owner, tenant}}``). Lookups are keyed
    by resource id (and resource type when ``type_column`` is set)."""

    kind: Literal["table"]
    sqlite: str | None = None  # path to a SQLite file (relative to the config's directory)
    # A table in a database of the platform's own: postgresql://user@host/db (psycopg 3) or
    # sqlite:////abs/path.db. Read-only queries; the password belongs in PGPASSWORD/.pgpass.
    url: str | None = None
    table: str = Field(default="resource_owners", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    id_column: str = Field(default="resource_id", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    owner_column: str = Field(default="owner", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    tenant_column: str | None = Field(default="tenant", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    type_column: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    file: str | None = None  # a YAML map resource_id -> {owner, tenant}
    entries: dict[str, OwnerEntry] | None = None

    @model_validator(mode="after")
    def _one(self) -> TableOwnerSourceConfig:
        given = [x for x in (self.sqlite, self.url, self.file, self.entries) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of sqlite, url, file or entries")
        if self.url is not None:
            from portcullis.storage.engine import StorageConfig

            StorageConfig(url=self.url)  # the same URL rules as `storage.url` (ValueError says which)
        return self


class UpstreamOwnerSourceConfig(_Model):
    """Owners from an HTTP GET to ``url`` (placeholders ``{type}``, ``{id}``, ``{tenant}``,
    percent-encoded) answering JSON ``{"owner": ..., "tenant": ...}``; 404 means no such
    resource. Answers are cached briefly; a timeout or any other answer fails closed."""

    kind: Literal["upstream"]
    url: str
    timeout_seconds: float = Field(default=1.0, gt=0, le=30)
    cache_seconds: float = Field(default=5.0, ge=0, le=300)
    cache_size: int = Field(default=10_000, ge=0, le=1_000_000)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        probe = v.replace("{type}", "t").replace("{id}", "i").replace("{tenant}", "n")
        if "{" in probe or "}" in probe:
            raise ValueError("only the placeholders {type}, {id} and {tenant} are allowed")
        try:
            u = urlsplit(probe)
            u.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("not a valid URL") from None
        if not u.hostname or u.username or u.password:
            raise ValueError("needs a host (and no credentials in the URL)")
        if "{" in urlsplit(v).netloc:
            raise ValueError("placeholders belong in the path or query, not the host")
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        if u.scheme != "https" and not (u.scheme == "http" and loopback):
            raise ValueError("must be https (plain http only on loopback)")
        return v


class HeaderOwnerSourceConfig(_Model):
    """Owners named by the upstream's response headers. Known only after the upstream
    answered, so usable only on safe methods (GET, HEAD, OPTIONS): a write would have
    happened before the check. Writes need a ``table`` or ``upstream`` source."""

    kind: Literal["header"]
    owner_header: str = Field(default="x-resource-owner", pattern=r"^[A-Za-z0-9-]{1,64}$")
    tenant_header: str | None = Field(default="x-resource-tenant", pattern=r"^[A-Za-z0-9-]{1,64}$")


OwnerSourceConfig = Annotated[
    TableOwnerSourceConfig | UpstreamOwnerSourceConfig | HeaderOwnerSourceConfig,
    Field(discriminator="kind"),
]


class ResourceConfig(_Model):
    """What a route's requests act on: a Cedar entity type, the path parameter holding
    its id, its sensitivity label, and where its owner comes from."""

    type: str = Field(pattern=_CEDAR_TYPE)
    id_param: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tenant_param: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    sensitivity: Sensitivity = "internal"
    owner: str | None = None  # the name of an owner source

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v in _RESERVED_TYPES:
            raise ValueError(f"{v!r} is a built-in Cedar type here; choose another name")
        return v


class PolicyConfig(_Model):
    """The ``policy:`` section. Decisions fail closed: an error anywhere denies."""

    dir: str | None = None  # Cedar files (*.cedar) and an optional schema (*.cedarschema), beside the config
    library: list[LibraryPolicy] = Field(default_factory=list)
    roles: RolesConfig = Field(default_factory=RolesConfig)
    default_clearance: Sensitivity = "internal"
    action_groups: dict[Annotated[str, Field(pattern=_NAME)], list[Annotated[str, Field(pattern=_NAME)]]] = Field(
        default_factory=dict)
    resources: dict[Annotated[str, Field(pattern=_NAME)], ResourceConfig] = Field(default_factory=dict)
    owner_sources: dict[Annotated[str, Field(pattern=_NAME)], OwnerSourceConfig] = Field(default_factory=dict)
    business_hours: BusinessHours = Field(default_factory=BusinessHours)
    networks: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], list[str]] = Field(
        default_factory=dict)
    risk_threshold: int = Field(default=70, ge=1, le=100)
    decision_cache_size: int = Field(default=10_000, ge=0, le=10_000_000)
    reload_poll_seconds: float = Field(default=2.0, ge=0.05, le=3600)

    @field_validator("library")
    @classmethod
    def _library(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a library policy is listed twice")
        return v

    @field_validator("networks")
    @classmethod
    def _networks(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, cidrs in v.items():
            if not cidrs:
                raise ValueError(f"{name}: list at least one CIDR")
            for i, c in enumerate(cidrs):
                try:
                    ipaddress.ip_network(c, strict=True)
                except ValueError as exc:
                    raise ValueError(f"{name}[{i}]: {exc}") from None
        return v

    @model_validator(mode="after")
    def _references(self) -> PolicyConfig:
        errors: list[str] = []
        for route, res in self.resources.items():
            if res.owner is not None and res.owner not in self.owner_sources:
                errors.append(f"resources.{route}.owner: unknown owner source {res.owner!r}")
            if res.owner is not None and res.id_param is None:
                errors.append(f"resources.{route}.owner: an owner needs id_param (which resource?)")
        for lib, group in LIBRARY_GROUPS.items():
            if lib in self.library and group not in self.action_groups:
                errors.append(f"library: {lib!r} applies to the action group {group!r}; declare "
                              f"action_groups.{group} (the routes it covers)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def resolve_dir(self, base: Path) -> Path | None:
        """The policy directory, relative paths taken from ``base`` (the config's directory)."""
        if self.dir is None:
            return None
        p = Path(self.dir)
        return p if p.is_absolute() else base / p


def role_name_ok(name: str) -> bool:
    """Whether a role name from a credential may be mapped to a Cedar role."""
    return re.match(_ROLE, name) is not None
