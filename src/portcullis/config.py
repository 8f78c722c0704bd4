"""The gateway's config file: one YAML document, validated strictly.

Unknown keys are errors, and every error names its exact path, e.g.
``routes[3].upstream: unknown upstream 'billing'``. Each stage's own model lives
beside its handler; this module composes them and checks what crosses models
(references between names, deny by default).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from portcullis.credentials.introspection import IntrospectionConfig
from portcullis.credentials.jwt import JwtConfig
from portcullis.credentials.rfc9449 import DpopConfig
from portcullis.forward_auth import ForwardAuthConfig
from portcullis.governance.service import GovernanceConfig
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.http import AsRoutes
from portcullis.policy.config import PolicyConfig
from portcullis.policy.mapping import check_routes
from portcullis.stages.limit import ADMISSION_KEYS, RateLimitConfig, TrafficConfig
from portcullis.stages.normalize import NormalizeConfig
from portcullis.stages.proxy import UpstreamConfig
from portcullis.stages.route import RouteConfig, parse_template
from portcullis.stages.signature import SignaturesConfig
from portcullis.storage.engine import StorageConfig
from portcullis.tls import TlsConfig
from portcullis.traffic.config import RedisConfig

MAX_CONFIG_BYTES = 4 * 1024 * 1024
AS_PATH_PREFIXES = AsRoutes.PREFIXES
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class ListenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class MetricsListenConfig(ListenConfig):
    port: int = Field(default=9102, ge=0, le=65535)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: ListenConfig = ListenConfig()
    metrics: MetricsListenConfig | None = MetricsListenConfig()
    shutdown_grace_seconds: int = Field(default=10, ge=1, le=600)
    keep_alive_seconds: int = Field(default=5, ge=1, le=300)
    tls: TlsConfig | None = None
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(default=512, ge=1, le=100_000)
    max_backlog: int = Field(default=100_000, ge=1, le=10_000_000)
    # Group commit: how long the writer waits after an event for more to join its batch.
    # Each batch costs a transaction, an fsync and a signed checkpoint; it delays when an
    # event becomes durable, never a request.
    linger_ms: float = Field(default=10.0, ge=0, le=100)


class KeysConfig(BaseModel):
    """API key settings: the default limit for keys that carry none of their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_rate_limit: RateLimitConfig | None = None
    revocation_poll_seconds: float = Field(default=0.25, gt=0, le=10)


class GatewayConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=1, ge=1, le=1)
    data_dir: str = "./data"
    server: ServerConfig = ServerConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    keys: KeysConfig = KeysConfig()
    jwt: JwtConfig | None = None
    introspection: IntrospectionConfig | None = None
    dpop: DpopConfig | None = None
    signatures: SignaturesConfig | None = None
    auth_server: AuthServerConfig | None = None
    governance: GovernanceConfig = GovernanceConfig()
    policy: PolicyConfig | None = None
    forward_auth: ForwardAuthConfig | None = None  # the decision listener for other proxies
    audit: AuditConfig = AuditConfig()
    # Where every store lives; None: the data directory's binding, by default SQLite files there.
    storage: StorageConfig | None = None
    redis: RedisConfig | None = None  # shared counters, replay caches, revocation fan-out
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    rate_limits: dict[str, RateLimitConfig] = Field(default_factory=dict)
    traffic: TrafficConfig = TrafficConfig()  # limits on every route, quotas, concurrency, abuse, trust
    routes: list[RouteConfig] = Field(min_length=1)

    @field_validator("upstreams", "rate_limits")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"invalid name {name!r}: 1-100 ASCII letters, digits, '-', '_', '.'")
        return v

    @field_validator("rate_limits")
    @classmethod
    def _reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "credential" in v:
            raise ValueError("'credential' is reserved for each key's own limit; choose another name")
        return v


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where it came from (relative paths resolve against it)."""

    config: GatewayConfig
    path: Path | None

    @property
    def data_dir(self) -> Path:
        d = Path(self.config.data_dir)
        if not d.is_absolute() and self.path is not None:
            d = self.path.parent / d
        return d.resolve()


class ConfigError(Exception):
    """The config is invalid; `errors` lists ``path: message`` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _cross_check(cfg: GatewayConfig) -> list[str]:
    errors: list[str] = []
    if cfg.auth_server is not None and cfg.jwt is not None:
        for i, iss in enumerate(cfg.jwt.issuers):
            if iss.issuer.rstrip("/") == cfg.auth_server.issuer:
                errors.append(f"jwt.issuers[{i}].issuer: the built-in authorization server's issuer is trusted "
                              "already; remove this entry")
    if cfg.policy is not None:
        errors.extend(check_routes(cfg.policy, cfg.routes))
        gdir, pdir = cfg.governance.policy_dir, cfg.policy.dir
        if gdir is not None and pdir is not None and os.path.normpath(str(gdir)) != os.path.normpath(pdir):
            # Four-eyes policy changes are validated against `policy.dir` and written to
            # `governance.policy_dir`: two directories would approve one thing, serve another.
            errors.append(f"governance.policy_dir: {gdir!s} is not policy.dir ({pdir}); they must be the same")
    errors.extend(_traffic_check(cfg))
    names: dict[str, int] = {}
    seen: dict[tuple[str | None, str, tuple[tuple[str, bool], ...]], int] = {}
    for i, r in enumerate(cfg.routes):
        at = f"routes[{i}]"
        if r.name in names:
            errors.append(f"{at}.name: duplicate route name {r.name!r} (also routes[{names[r.name]}])")
        names.setdefault(r.name, i)
        if r.upstream not in cfg.upstreams:
            errors.append(f"{at}.upstream: unknown upstream {r.upstream!r}")
        if r.rate_limit is not None and r.rate_limit not in cfg.rate_limits:
            errors.append(f"{at}.rate_limit: unknown rate limit {r.rate_limit!r}")
        segs = parse_template(r.path)
        # Compare shapes: '/a/{x}' and '/a/{y}' are the same route.
        shape = tuple((t if not p else "{}", p) for t, p in segs)
        for m in r.methods:
            key = (r.host, m, shape)
            if key in seen:
                errors.append(f"{at}: {m} {r.path} duplicates routes[{seen[key]}]")
            seen.setdefault(key, i)
        params = {t for t, p in segs if p}
        if r.public:
            if r.auth or r.scopes or r.roles or r.tenant_param:
                errors.append(f"{at}: a public route cannot also require auth, scopes, roles or a tenant")
        elif not r.auth:
            errors.append(f"{at}: no auth requirement; add 'auth: [api_key]' or mark it 'public: true'")
        if "jwt" in r.auth and cfg.jwt is None and cfg.auth_server is None:
            errors.append(f"{at}.auth: 'jwt' needs a top-level 'jwt:' section with trusted issuers "
                          "(or 'auth_server:', whose tokens the gateway trusts)")
        if cfg.auth_server is not None and r.path.startswith(AS_PATH_PREFIXES):
            errors.append(f"{at}.path: {r.path!r} is the authorization server's "
                          f"({', '.join(AS_PATH_PREFIXES)} are reserved when 'auth_server:' is set)")
        if r.require_signature and cfg.signatures is None:
            errors.append(f"{at}.require_signature: needs a top-level 'signatures:' section with partner keys")
        if r.sign_responses and (cfg.signatures is None or cfg.signatures.response_signing is None):
            errors.append(f"{at}.sign_responses: needs 'signatures.response_signing' (the gateway's key)")
        if "introspection" in r.auth and cfg.introspection is None:
            errors.append(f"{at}.auth: 'introspection' needs a top-level 'introspection:' section")
        if r.tenant_param is not None and r.tenant_param not in params:
            errors.append(f"{at}.tenant_param: {r.tenant_param!r} is not a parameter of {r.path!r}")
        if r.upstream_path is not None:
            try:
                up_params = {t for t, p in parse_template(r.upstream_path) if p}
            except ValueError as exc:
                errors.append(f"{at}.upstream_path: {exc}")
            else:
                if not up_params <= params:
                    errors.append(f"{at}.upstream_path: uses parameters not in the path: "
                                  f"{', '.join(sorted(up_params - params))}")
    return errors


def _traffic_check(cfg: GatewayConfig) -> list[str]:
    """`traffic:` references: named policies, upstreams; admission keys."""
    errors: list[str] = []
    t = cfg.traffic
    for field in ("rate_limits", "admission"):
        names: list[str] = getattr(t, field)
        for i, name in enumerate(names):
            at = f"traffic.{field}[{i}]"
            if name not in cfg.rate_limits:
                errors.append(f"{at}: unknown rate limit {name!r}")
            elif field == "admission" and cfg.rate_limits[name].key not in ADMISSION_KEYS:
                errors.append(f"{at}: {name!r} is counted per {cfg.rate_limits[name].key}, which is not known "
                              "before authentication; admission limits need key 'global' or 'ip'")
            if names.index(name) != i:
                errors.append(f"{at}: {name!r} is listed twice")
    for i, name in enumerate(t.admission):
        if name in t.rate_limits:
            errors.append(f"traffic.admission[{i}]: {name!r} is also in traffic.rate_limits; it would count "
                          "every request twice")
    for name in t.concurrency.upstreams:
        if name not in cfg.upstreams:
            errors.append(f"traffic.concurrency.upstreams.{name}: unknown upstream {name!r}")
    return errors


def _raw_references(doc: dict[str, Any]) -> list[str]:
    """Unknown upstream / rate-limit names in a document that failed validation."""
    ups, limits, routes = doc.get("upstreams"), doc.get("rate_limits") or {}, doc.get("routes")
    if not isinstance(ups, dict) or not isinstance(limits, dict) or not isinstance(routes, list):
        return []
    errors = []
    for i, r in enumerate(routes):
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("upstream"), str) and r["upstream"] not in ups:
            errors.append(f"routes[{i}].upstream: unknown upstream {r['upstream']!r}")
        if isinstance(r.get("rate_limit"), str) and r["rate_limit"] not in limits:
            errors.append(f"routes[{i}].rate_limit: unknown rate limit {r['rate_limit']!r}")
    return errors


def parse_config(text: str, path: Path | None = None) -> LoadedConfig:
    """Validate a config document; raises `ConfigError` with every problem found."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(file): larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    if not isinstance(doc, dict):
        raise ConfigError(["(top level): expected a mapping of settings"])
    try:
        cfg = GatewayConfig.model_validate(doc)
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            errors.append(f"{_loc(e['loc'])}: {msg}")
        # Name references are checked on the raw document too, so one run of
        # `portcullis check` reports every problem rather than one layer at a time.
        errors += [e for e in _raw_references(doc) if e not in errors]
        raise ConfigError(errors) from None
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return LoadedConfig(cfg, path)


def load_config(path: Path) -> LoadedConfig:
    """Read and validate a config file; `ConfigError` on any problem, including I/O."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"(file): cannot read ({type(exc).__name__}: {exc.args[-1] if exc.args else ''})"]) from None
    return parse_config(text, path.resolve())
