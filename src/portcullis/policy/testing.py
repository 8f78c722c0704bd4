"""Policy unit tests and explanations for operators: ``portcullis policy test DIR`` and
``portcullis policy explain``.

A test file (``DIR/*.test.yaml`` or ``DIR/tests/*.yaml``) lists cases, each a described
request run through the same mapping and engine as the gateway::

    cases:
      - name: alice may edit her own project
        principal: {subject: alice, tenant: acme, roles: [editor], acr: urn:portcullis:acr:mfa}
        action: project             # the route name
        method: PUT                 # needed when the route serves several methods
        path: {tenant: acme, id: p1}
        resource: {owner: alice, tenant: acme}   # what the owner source would answer
        context: {time: "2025-03-03T10:00:00", ip: 10.1.2.3, risk_score: 0}
        expect: allow
        policies: [editors-write-projects]       # optional: the determining policies

``time`` without an offset is local time in ``policy.business_hours.timezone``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from portcullis.exchange import Principal
from portcullis.policy.config import PolicyConfig
from portcullis.policy.engine import Decision, PolicyEngine, PolicyError
from portcullis.policy.mapping import DecisionInput, RouteLike
from portcullis.policy.owners import Owner

MAX_TEST_FILE_BYTES = 4 * 1024 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CasePrincipal(_Model):
    """Who calls: the facts a credential would carry."""

    subject: str = Field(min_length=1)
    tenant: str
    kind: Literal["user", "client"] = "user"
    roles: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    client_id: str | None = None
    acr: str | None = None
    amr: list[str] = Field(default_factory=list)
    auth_age_minutes: int | None = Field(default=None, ge=0)
    dpop: bool = False
    mtls: bool = False


class CaseResource(_Model):
    """What the route's owner source answers for the resource."""

    owner: str = Field(min_length=1)
    tenant: str | None = None


class CaseContext(_Model):
    """The request's circumstances."""

    time: datetime | None = None
    ip: str = "127.0.0.1"
    country: str | None = None
    risk_score: int = Field(default=0, ge=0, le=100)
    extra_roles: list[str] = Field(default_factory=list)


class RequestDescription(_Model):
    """A request as an operator describes it (a test case without the expectation)."""

    name: str = ""
    principal: CasePrincipal
    action: str = Field(min_length=1)
    method: str | None = None
    path: dict[str, str] = Field(default_factory=dict)
    resource: CaseResource | None = None
    context: CaseContext = Field(default_factory=CaseContext)


class PolicyCase(RequestDescription):
    """A test case: a request and the decision expected."""

    expect: Literal["allow", "deny"]
    policies: list[str] | None = None


class CaseFile(_Model):
    cases: list[PolicyCase] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route as the tests need it (a `RouteLike`)."""

    name: str
    path: str
    methods: list[str]
    tenant_param: str | None = None


@dataclass(slots=True)
class CaseResult:
    """One case's outcome; ``message`` says why it failed."""

    file: str
    name: str
    passed: bool
    expected: str
    decision: Decision | None
    message: str = ""


@dataclass(slots=True)
class PolicyTestReport:
    """The outcome of a test run; ``problems`` are load errors (no case could run)."""

    results: list[CaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)

    @property
    def ok(self) -> bool:
        return not self.problems and self.failed == 0 and bool(self.results)

    def render(self) -> str:
        """Plain text for a CI log, ending with ``N passed, N failed``."""
        lines = [f"error: {p}" for p in self.problems]
        for r in self.results:
            mark = "PASS" if r.passed else "FAIL"
            lines.append(f"{mark} {r.file}: {r.name}")
            if not r.passed:
                lines.append(f"     {r.message}")
        lines.append(f"{self.passed} passed, {self.failed + len(self.problems)} failed")
        return "\n".join(lines)


def _principal(p: CasePrincipal, now: float) -> Principal:
    client = p.client_id if p.client_id is not None else (p.subject if p.kind == "client" else None)
    return Principal(
        subject=p.subject, tenant=p.tenant, credential_id="test",
        credential_kind="api_key" if p.kind == "client" and client == p.subject else "jwt",
        scopes=frozenset(p.scopes), roles=frozenset(p.roles), client_id=client,
        cnf_jkt="test-jkt" if p.dpop else None, cnf_x5t="test-x5t" if p.mtls else None,
        acr=p.acr, amr=tuple(p.amr),
        auth_time=None if p.auth_age_minutes is None else now - p.auth_age_minutes * 60,
    )


def build_described(engine: PolicyEngine, desc: RequestDescription, *, default_now: float) -> DecisionInput:
    """The decision input for a described request; ValueError if it names no route or
    leaves the method ambiguous."""
    mapper = engine.mapper
    route = mapper.routes.get(desc.action)
    if route is None:
        raise ValueError(f"no route is named {desc.action!r}")
    method = (desc.method or "").upper()
    if not method:
        if len(route.methods) != 1:
            raise ValueError(f"route {desc.action!r} serves {', '.join(route.methods)}: give 'method'")
        method = route.methods[0]
    elif method not in route.methods and not (method == "HEAD" and "GET" in route.methods):
        raise ValueError(f"route {desc.action!r} does not serve {method}")
    ctx = desc.context
    now = default_now
    if ctx.time is not None:
        t = ctx.time
        if t.tzinfo is None:
            t = t.replace(tzinfo=ZoneInfo(mapper.cfg.business_hours.timezone))
        now = t.timestamp()
    owner = Owner(desc.resource.owner, desc.resource.tenant) if desc.resource is not None else None
    return mapper.build(_principal(desc.principal, now), route=desc.action, method=method,
                        path_params=desc.path, client_ip=ctx.ip, now=now, extra_roles=ctx.extra_roles,
                        owner=owner, risk_score=ctx.risk_score, country=ctx.country)


def _load_cases(path: Path) -> list[PolicyCase]:
    raw = path.read_bytes()
    if len(raw) > MAX_TEST_FILE_BYTES:
        raise ValueError(f"larger than {MAX_TEST_FILE_BYTES} bytes")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    try:
        return CaseFile.model_validate(doc).cases
    except ValidationError as exc:
        raise ValueError("; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))) from None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def find_test_files(policy_dir: Path) -> list[Path]:
    """The test files of a policy directory."""
    return sorted(policy_dir.glob("*.test.yaml")) + sorted(policy_dir.glob("tests/*.yaml"))


def run_cases(engine: PolicyEngine, files: Sequence[Path], *, now: float = 0.0) -> PolicyTestReport:
    """Run every case of ``files``; a case without ``context.time`` runs at ``now``."""
    report = PolicyTestReport()
    for path in files:
        try:
            cases = _load_cases(path)
        except (OSError, ValueError) as exc:
            report.problems.append(f"{path}: {exc}")
            continue
        for i, case in enumerate(cases):
            name = case.name or f"case {i + 1}"
            try:
                inp = build_described(engine, case, default_now=now)
            except ValueError as exc:
                report.results.append(CaseResult(str(path), name, False, case.expect, None, f"invalid case: {exc}"))
                continue
            d = engine.decide_uncached(inp)
            got = "allow" if d.allowed else "deny"
            msgs: list[str] = []
            if got != case.expect:
                msgs.append(f"expected {case.expect}, got {got}")
            if case.policies is not None and sorted(case.policies) != sorted(d.policies):
                msgs.append(f"expected determining policies {sorted(case.policies)}, got {sorted(d.policies)}")
            if msgs:
                msgs.append(f"reason {d.reason}, policies {list(d.policies)}"
                            + (f"; errors: {'; '.join(d.errors)}" if d.errors else ""))
            report.results.append(CaseResult(str(path), name, not msgs, case.expect, d, "; ".join(msgs)))
    return report


def run_dir(policy_dir: Path, cfg: PolicyConfig, routes: Sequence[RouteLike], *, now: float = 0.0) -> PolicyTestReport:
    """``portcullis policy test DIR``: load the policies of ``policy_dir`` (a load error is
    reported, not raised) and run its test files."""
    try:
        engine = PolicyEngine(cfg, routes, policy_dir)
    except PolicyError as exc:
        return PolicyTestReport(problems=[str(p) for p in exc.problems])
    files = find_test_files(policy_dir)
    if not files:
        return PolicyTestReport(problems=[f"{policy_dir}: no test files (*.test.yaml or tests/*.yaml)"])
    return run_cases(engine, files, now=now)


def explain(engine: PolicyEngine, description: Mapping[str, Any], *, now: float) -> str:
    """Why a described request (`RequestDescription` fields) would be allowed or denied:
    the decision, the policies that determined it with their source, and any errors."""
    try:
        desc = RequestDescription.model_validate(description)
        inp = build_described(engine, desc, default_now=now)
    except ValidationError as exc:
        return "invalid request description: " + "; ".join(
            f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
    except ValueError as exc:
        return f"invalid request description: {exc}"
    d = engine.decide_uncached(inp)
    lines = [f"{inp.describe()} ({inp.context['method']})",
             f"decision: {'ALLOW' if d.allowed else 'DENY'} ({d.reason})"]
    if d.policies:
        lines.append("determined by:" if d.allowed else "forbidden by:")
        for label in d.policies:
            info = engine.policy_info(label)
            where = f"{info.file}:{info.line}" if info else "?"
            lines.append(f"  {label}  ({where})")
            if info is not None:
                lines += [f"    {t}" for t in info.text.splitlines() if not t.lstrip().startswith("//")]
    elif not d.errors:
        lines.append("no permit policy applies to this request (Cedar denies by default)")
    if d.errors:
        lines.append("errors (any error denies):")
        lines += [f"  {e}" for e in d.errors]
    principal, resource = inp.entities[0], inp.entities[1]
    lines.append("principal: " + json.dumps({"roles": principal["attrs"]["roles"],
                                              "clearance": principal["attrs"]["clearance_label"],
                                              "tenant": principal["attrs"]["tenant"]}))
    lines.append("resource: " + json.dumps(resource["attrs"]))
    lines.append("context: " + json.dumps(inp.context))
    return "\n".join(lines)


def load_setup(path: Path) -> tuple[PolicyConfig, list[RouteSpec]]:
    """A standalone setup file (``policy:`` and ``routes:`` of name/path/methods/tenant_param),
    for policy repositories tested apart from a gateway config."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with 'policy' and 'routes'")
    cfg = PolicyConfig.model_validate(doc.get("policy") or {})
    routes = [RouteSpec(r["name"], r["path"], [m.upper() for m in r["methods"]], r.get("tenant_param"))
              for r in doc.get("routes") or []]
    return cfg, routes
