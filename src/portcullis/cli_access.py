"""`portcullis access`: four-eyes role and policy changes, just-in-time roles and
break-glass. The command only parses and prints; the rules live in
`portcullis.governance.service` (the admin console calls the same service).

Every command acts as the admin named by ``--as``. With ``--config FILE`` the settings
come from the file's ``governance:`` section; with ``--data-dir DIR`` from
``DIR/governance.yaml`` if present (the same keys), else the defaults, under which
nobody may approve until approvers are configured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from portcullis.cli import ConfigOpt, DataDirOpt, _data_dir, _load_or_exit, app, fail, parse_duration
from portcullis.governance.service import (
    ACTOR_PATTERN,
    MAX_POLICY_BYTES,
    Governance,
    GovernanceConfig,
    GovernanceError,
    InvalidRequestError,
    PolicyCheck,
    cedar_syntax_problems,
    open_governance,
)
from portcullis.governance.store import ChangeRequest, RoleAssignment

access_app = typer.Typer(no_args_is_help=True,
                         help="Four-eyes role and policy changes, just-in-time roles, break-glass.")
request_app = typer.Typer(no_args_is_help=True, help="Ask for a change; it applies once a second admin approves.")
access_app.add_typer(request_app, name="request")
app.add_typer(access_app, name="access")

AsOpt = Annotated[str, typer.Option("--as", help="The admin acting (your own name).")]
TenantOpt = Annotated[str, typer.Option(help="The tenant the role is held in.")]
PrincipalOpt = Annotated[str, typer.Option(help="The user, client or API key id.")]
RoleOpt = Annotated[str, typer.Option(help="The role.")]
TtlOpt = Annotated[str | None, typer.Option("--ttl", help="How long the request waits for approval (e.g. 1d).")]
ReasonOpt = Annotated[str, typer.Option(help="Why (kept in the audit log).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
GOVERNANCE_FILE = "governance.yaml"


def _config_error(source: Path, exc: ValidationError, prefix: str) -> typer.Exit:
    for e in exc.errors():
        loc = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        typer.echo(f"{source}: {loc}: {e['msg']}", err=True)
    return typer.Exit(1)


def governance_config(config: Path | None, data_dir: Path) -> GovernanceConfig:
    """The config file's `governance:` section, else ``DATA_DIR/governance.yaml``, else
    defaults; relative `policy_dir` against the file's directory. Exit 1 on errors."""
    if config is not None:
        return _load_or_exit(config).config.governance.resolved(config.resolve().parent)
    source = data_dir / GOVERNANCE_FILE
    if not source.exists():
        return GovernanceConfig()
    try:
        section: Any = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"{source}: cannot read ({type(exc).__name__})") from None
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise fail(f"{source}: expected a mapping")
    try:
        cfg = GovernanceConfig.model_validate(section)
    except ValidationError as exc:
        raise _config_error(source, exc, "") from None
    return cfg.resolved(source.resolve().parent)


def _schema_check(config: Path | None) -> PolicyCheck:
    """With a gateway config that has policies, a policy change must load with the whole
    set against its Cedar schema (a typo in an attribute or action is refused when the
    change is requested and again when approved); otherwise it must at least parse."""
    if config is None:
        return cedar_syntax_problems
    loaded = _load_or_exit(config)
    pcfg = loaded.config.policy
    policy_dir = pcfg.resolve_dir(config.resolve().parent) if pcfg is not None else None
    if pcfg is None or policy_dir is None:
        return cedar_syntax_problems
    routes = list(loaded.config.routes)

    def check(name: str, text: str) -> list[str]:
        from portcullis.policy.engine import candidate_problems

        return candidate_problems(pcfg, routes, policy_dir, name, text)

    return check


@contextmanager
def governance(config: Path | None, data_dir: Path | None) -> Iterator[Governance]:
    """The data directory's governance service; closed on exit."""
    d = _data_dir(config, data_dir)
    cfg = governance_config(config, d)
    gov = open_governance(d, cfg, policy_check=_schema_check(config))
    try:
        yield gov
    finally:
        gov.close()


def _actor(name: str) -> str:
    if not ACTOR_PATTERN.fullmatch(name):
        raise fail("--as: 1-100 of A-Z a-z 0-9 _ . : @ -", 2)
    return name


def _refused(exc: GovernanceError) -> typer.Exit:
    return fail(str(exc), 2 if isinstance(exc, InvalidRequestError) else 1)


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _describe(req: ChangeRequest) -> str:
    p = req.payload
    if req.kind == "role_assignment":
        jit = f" for {p['duration']}s after approval (JIT)" if p.get("duration") else ""
        return f"grant {p['role']} to {p['principal']} in {p['tenant']}{jit}"
    if req.kind == "role_removal":
        return f"remove {p['role']} from {p['principal']} in {p['tenant']}"
    base = p["base_sha256"][:12] if p["base_sha256"] else "(new file)"
    return f"replace policy {p['file']} {base} -> {p['sha256'][:12]}"


def _request_json(req: ChangeRequest, now: float, *, with_text: bool) -> dict[str, Any]:
    return {**req.to_dict(with_text=with_text), "status": req.status_at(now)}


def _assignment_json(a: RoleAssignment, now: float) -> dict[str, Any]:
    return {**a.to_dict(), "status": a.status(now)}


def _requested(req: ChangeRequest, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_request_json(req, time.time(), with_text=False)))
        return
    typer.echo(f"requested {req.id}: {_describe(req)}\n"
               f"expires {_when(req.expires_at)}; another admin approves with:\n"
               f"  portcullis access approve {req.id} --as NAME")


@request_app.command("role")
def request_role(
    *, tenant: TenantOpt, principal: PrincipalOpt, role: RoleOpt, as_: AsOpt, ttl: TtlOpt = None,
    reason: ReasonOpt = "", as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Ask for a standing role assignment."""
    actor = _actor(as_)
    ttl_s = parse_duration(ttl) if ttl else None
    with governance(config, data_dir) as gov:
        try:
            req = gov.request_role(tenant, principal, role, actor, ttl=ttl_s, reason=reason)
        except GovernanceError as exc:
            raise _refused(exc) from None
        _requested(req, as_json)


@request_app.command("removal")
def request_removal(
    *, tenant: TenantOpt, principal: PrincipalOpt, role: RoleOpt, as_: AsOpt, ttl: TtlOpt = None,
    reason: ReasonOpt = "", as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Ask to take a role away (every active assignment of it)."""
    actor = _actor(as_)
    ttl_s = parse_duration(ttl) if ttl else None
    with governance(config, data_dir) as gov:
        try:
            req = gov.request_removal(tenant, principal, role, actor, ttl=ttl_s, reason=reason)
        except GovernanceError as exc:
            raise _refused(exc) from None
        _requested(req, as_json)


@request_app.command("jit")
def request_jit(
    *, tenant: TenantOpt, principal: PrincipalOpt, role: RoleOpt,
    for_: Annotated[str, typer.Option("--for", help="How long the role is held after approval (e.g. 2h).")],
    reason: Annotated[str, typer.Option(help="Why (required; kept in the audit log).")],
    as_: AsOpt, ttl: TtlOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Ask for a just-in-time role: held for --for after approval, then lost by itself."""
    actor = _actor(as_)
    duration = parse_duration(for_)
    ttl_s = parse_duration(ttl) if ttl else None
    with governance(config, data_dir) as gov:
        try:
            req = gov.request_jit(tenant, principal, role, duration=duration, requested_by=actor, reason=reason,
                                  ttl=ttl_s)
        except GovernanceError as exc:
            raise _refused(exc) from None
        _requested(req, as_json)


@request_app.command("policy")
def request_policy(
    *, file: Annotated[Path, typer.Argument(help="The new Cedar policy file.")], as_: AsOpt,
    name: Annotated[str | None, typer.Option(
        help="The policy file to replace in governance.policy_dir (default: FILE's name).")] = None,
    base_sha256: Annotated[str | None, typer.Option(
        help="The sha256 of the version you edited (default: the file as it is now).")] = None,
    ttl: TtlOpt = None, reason: ReasonOpt = "", as_json: JsonOpt = False, config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Ask to replace (or create) a Cedar policy file; refused as stale if it changes meanwhile."""
    actor = _actor(as_)
    ttl_s = parse_duration(ttl) if ttl else None
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise fail(f"{file}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise fail(f"{file}: larger than {MAX_POLICY_BYTES} bytes", 2)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise fail(f"{file}: not UTF-8 text", 2) from None
    with governance(config, data_dir) as gov:
        try:
            req = gov.request_policy_change(name or file.name, text, actor, ttl=ttl_s, reason=reason,
                                            base_sha256=base_sha256.lower() if base_sha256 else None,
                                            based_on_current=base_sha256 is None)
        except GovernanceError as exc:
            raise _refused(exc) from None
        _requested(req, as_json)


@access_app.command("approve")
def approve(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request id (req_...).")],
    *, as_: AsOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Approve someone else's request; it applies at once."""
    actor = _actor(as_)
    with governance(config, data_dir) as gov:
        try:
            req = gov.approve(request_id, actor)
        except GovernanceError as exc:
            raise _refused(exc) from None
        granted = [a for a in gov.assignments() if a.request_id == req.id]
    suffix = "".join(f"\nassignment {a.id}: {a.role} for {a.principal} in {a.tenant} until {_when(a.expires_at)}"
                     for a in granted)
    typer.echo(f"approved and applied {req.id}: {_describe(req)}{suffix}")


@access_app.command("reject")
def reject(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request id (req_...).")],
    *, as_: AsOpt, reason: ReasonOpt = "", config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Reject a request (or withdraw your own)."""
    actor = _actor(as_)
    with governance(config, data_dir) as gov:
        try:
            req = gov.reject(request_id, actor, reason)
        except GovernanceError as exc:
            raise _refused(exc) from None
    typer.echo(f"rejected {req.id}: {_describe(req)}")


@access_app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request id (req_...).")],
    *, as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Show one request in full (for a policy change: the new text), to review it."""
    with governance(config, data_dir) as gov:
        try:
            req = gov.get_request(request_id)
        except GovernanceError as exc:
            raise _refused(exc) from None
    now = time.time()
    if as_json:
        typer.echo(json.dumps(_request_json(req, now, with_text=True)))
        return
    typer.echo(f"{req.id}  {req.status_at(now)}  {req.kind}\n  {_describe(req)}\n"
               f"  requested by {req.requested_by} at {_when(req.requested_at)}, expires {_when(req.expires_at)}")
    if req.reason:
        typer.echo(f"  reason: {req.reason}")
    if req.decided_by:
        typer.echo(f"  decided by {req.decided_by} at {_when(req.decided_at)}")
    if req.kind == "policy_change":
        typer.echo(f"--- new {req.payload['file']} (sha256 {req.payload['sha256']}) ---\n{req.payload['text']}")


@access_app.command("list")
def list_(
    *, pending: Annotated[bool, typer.Option("--pending", help="Only requests awaiting approval.")] = False,
    active: Annotated[bool, typer.Option("--active", help="Only role assignments in force.")] = False,
    as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """List requests and role assignments (everything unless --pending / --active)."""
    from rich.console import Console
    from rich.table import Table

    everything = not pending and not active
    now = time.time()
    with governance(config, data_dir) as gov:
        reqs = gov.requests() if everything or pending else []
        assigns = gov.assignments(active_only=active) if everything or active else []
    if pending:
        reqs = [r for r in reqs if r.status_at(now) == "pending"]
    if as_json:
        typer.echo(json.dumps({"requests": [_request_json(r, now, with_text=False) for r in reqs],
                               "assignments": [_assignment_json(a, now) for a in assigns]}))
        return
    console = Console()
    if everything or pending:
        rt = Table(title="requests")
        rt.add_column("request", no_wrap=True)
        rt.add_column("status", no_wrap=True)
        for col in ("change", "requested by", "expires"):
            rt.add_column(col)
        for r in reqs:
            rt.add_row(r.id, r.status_at(now), _describe(r), r.requested_by, _when(r.expires_at))
        console.print(rt)
    if everything or active:
        at = Table(title="role assignments")
        at.add_column("assignment", no_wrap=True)
        at.add_column("status", no_wrap=True)
        for col in ("kind", "tenant", "principal", "role", "granted by", "approved by", "expires"):
            at.add_column(col)
        for a in assigns:
            at.add_row(a.id, a.status(now), a.kind, a.tenant, a.principal, a.role, a.granted_by, a.approved_by or "",
                       _when(a.expires_at))
        console.print(at)


@access_app.command("revoke")
def revoke(
    assignment_id: Annotated[str, typer.Argument(metavar="ID", help="The assignment id (ra_...).")],
    *, as_: AsOpt, reason: ReasonOpt = "", config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """End a role assignment at once (JIT, break-glass or standing)."""
    actor = _actor(as_)
    with governance(config, data_dir) as gov:
        try:
            a = gov.revoke(assignment_id, actor, reason)
        except GovernanceError as exc:
            raise _refused(exc) from None
    typer.echo(f"revoked {a.id}: {a.role} for {a.principal} in {a.tenant}")


@access_app.command("break-glass")
def break_glass(
    *, tenant: TenantOpt, principal: PrincipalOpt, role: RoleOpt,
    for_: Annotated[str, typer.Option("--for", help="How long (at most governance.break_glass_max_seconds).")],
    reason: Annotated[str, typer.Option(help="Why (required; raises an alert).")],
    as_: AsOpt, config: ConfigOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Grant a role now, without approval, for a short time; raises an alert."""
    actor = _actor(as_)
    duration = parse_duration(for_)
    with governance(config, data_dir) as gov:
        try:
            a = gov.break_glass(tenant, principal, role, duration=duration, actor=actor, reason=reason)
        except GovernanceError as exc:
            raise _refused(exc) from None
    typer.echo(f"BREAK-GLASS {a.id}: {a.role} for {a.principal} in {a.tenant} until {_when(a.expires_at)}\n"
               "an alert has been raised; end it early with: portcullis access revoke " + a.id + " --as NAME")


@access_app.command("expire")
def expire(*, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Close requests past their expiry (audited); safe to run from cron."""
    with governance(config, data_dir) as gov:
        done = gov.expire_due()
    typer.echo(f"expired {len(done)} request(s)" + "".join(f"\n  {r.id}: {_describe(r)}" for r in done))
