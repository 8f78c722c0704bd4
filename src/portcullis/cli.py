"""The `portcullis` command line (typer)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from portcullis import __version__

if TYPE_CHECKING:
    from portcullis.config import LoadedConfig

# Tracebacks are for developers: main() turns expected failures into one `error:` line.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Portcullis: an API security gateway.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
audit_app = typer.Typer(no_args_is_help=True, help="Read and verify the audit log.")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
tokens_app = typer.Typer(no_args_is_help=True,
                         help="Revoke access tokens (JWT or introspected) by token id, subject or client.")
app.add_typer(tokens_app, name="tokens")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Gateway config file.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="A data directory (e.g. a demo's).")]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^(\d+)/(\d+)?([smhd])(?::(\d+))?$")


def fail(msg: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter(f"{text!r}: expected a positive duration like 90s, 15m, 12h or 30d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_rate(text: str) -> tuple[int, float, int]:
    """``REQUESTS/[N]UNIT[:BURST]``, e.g. ``60/1m:10`` -> (60, 60.0, 10). Burst defaults to requests."""
    m = _RATE.match(text.strip())
    if not m:
        raise typer.BadParameter(f"{text!r}: expected REQUESTS/PERIOD[:BURST], e.g. 60/1m:10")
    requests = int(m.group(1))
    period = int(m.group(2) or 1) * _UNITS[m.group(3)]
    burst = int(m.group(4)) if m.group(4) else requests
    if requests <= 0 or period <= 0 or burst <= 0:
        raise typer.BadParameter(f"{text!r}: requests, period and burst must be positive")
    return requests, float(period), burst


def _load_or_exit(config: Path) -> LoadedConfig:
    """The validated config, or one `path: problem` line per error and exit 1."""
    from portcullis.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        for e in exc.errors:
            typer.echo(f"{config}: {e}", err=True)
        raise typer.Exit(1) from None


def _data_dir(config: Path | None, data_dir: Path | None) -> Path:
    if (config is None) == (data_dir is None):
        raise fail("give exactly one of --config FILE or --data-dir DIR", 2)
    if data_dir is not None:
        if not data_dir.is_dir():
            raise fail(f"{data_dir}: no such directory")
        return data_dir.resolve()
    assert config is not None
    return _load_or_exit(config).data_dir


def _version_cb(value: bool) -> None:
    if value:
        typer.echo(f"portcullis {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Portcullis: a self-hosted API security gateway."""


@app.command()
def check(config: Annotated[Path, typer.Argument(help="Config file to validate.")]) -> None:
    """Validate a config file (and its Cedar policies against their schema); exits
    non-zero with one line per problem."""
    from portcullis.gateway import load_policy
    from portcullis.policy.engine import PolicyError

    loaded = _load_or_exit(config)
    cfg = loaded.config
    try:
        engine = load_policy(loaded)
    except PolicyError as exc:
        for problem in exc.problems:
            typer.echo(f"{config}: policy: {problem}", err=True)
        raise typer.Exit(1) from None
    if engine is not None:
        typer.echo(f"{config}: policies ok (generation {engine.generation})")
        if not engine.shapes:
            # Not a problem, a cost: every new user or object is a Cedar evaluation.
            typer.echo(f"{config}: note: the decision cache keys by whole inputs only: {engine.shapes_reason}")
    typer.echo(f"{config}: ok ({len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams, "
               f"{len(cfg.rate_limits)} rate limits)")


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config file.")],
    host: Annotated[str | None, typer.Option(help="Override server.listen.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override server.listen.port.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Gateway processes sharing the port (needs `redis:`).")] = 1,
    reuse_port: Annotated[bool, typer.Option(hidden=True)] = False,
    worker_index: Annotated[int, typer.Option(hidden=True, min=0)] = 0,
) -> None:
    """Run the gateway until SIGTERM or Ctrl-C."""
    from portcullis.observe import configure_logging
    from portcullis.server import serve as run

    loaded = _load_or_exit(config)
    configure_logging(loaded.config.server.log_level)
    if workers > 1:
        from portcullis.workers import serve_workers

        raise typer.Exit(serve_workers(config, loaded.config, workers, host, port))
    raise typer.Exit(run(loaded, host, port, reuse_port=reuse_port, worker_index=worker_index))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Unique, human-readable name.")],
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to.")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="A scope (repeat, or comma-separated).")],
    role: Annotated[list[str] | None, typer.Option("--role", help="A role (repeatable).")] = None,
    expires_in: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d or 12h.")] = None,
    rate_limit: Annotated[str | None, typer.Option(help="REQUESTS/PERIOD[:BURST], e.g. 60/1m:10.")] = None,
    signing_key: Annotated[str | None, typer.Option(
        help="Require RFC 9421 signatures by this key id (from the config's signatures.keys).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a key. The key is printed once and never stored: keep it safe."""
    from portcullis.keysadmin import create_key

    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,100}", name):
        raise fail("--name: 1-100 characters of letters, digits and _.:@-", 2)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", tenant):
        raise fail("--tenant: 1-100 characters of letters, digits and _.-", 2)
    scopes = sorted({s.strip() for item in scope for s in item.split(",") if s.strip()})
    for s in scopes:
        if not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]{1,100}", s):  # RFC 6749 §3.3 scope-token
            raise fail(f"--scope: {s!r} is not a valid scope token", 2)
    expires = time.time() + parse_duration(expires_in) if expires_in else None
    rl = parse_rate(rate_limit) if rate_limit else None
    d = _data_dir(config, data_dir)
    if signing_key is not None and config is not None:
        sigs = _load_or_exit(config).config.signatures
        if sigs is None or signing_key not in {k.key_id for k in sigs.keys}:
            raise fail(f"--signing-key: {signing_key!r} is not in the config's signatures.keys")
    try:
        rec, key = create_key(d, name=name, tenant=tenant, scopes=scopes, roles=sorted(set(role or [])),
                              expires_at=expires, rate_limit=rl, signing_key_id=signing_key)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({"key_id": rec.key_id, "key": key, "name": name, "tenant": tenant,
                               "scopes": scopes, "roles": sorted(rec.roles), "expires_at": expires,
                               "rate_limit": None if rl is None else
                               {"requests": rl[0], "per_seconds": rl[1], "burst": rl[2]}}))
    else:
        typer.echo(f"key id:  {rec.key_id}\nkey:     {key}\n(shown once; only a keyed hash is stored)")


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, data_dir: DataDirOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List keys (never the keys themselves)."""
    from rich.console import Console
    from rich.table import Table

    from portcullis.gateway import open_key_store

    store, _ = open_key_store(_data_dir(config, data_dir), create=False)
    records = store.list()
    store.close()
    now = time.time()

    def status(r: object) -> str:
        from portcullis.storage.protocols import ApiKeyRecord

        assert isinstance(r, ApiKeyRecord)
        if r.revoked_at is not None:
            return "revoked"
        if r.expires_at is not None and r.expires_at <= now:
            return "expired"
        return "active"

    if as_json:
        typer.echo(json.dumps([{"key_id": r.key_id, "name": r.name, "tenant": r.tenant,
                                "scopes": sorted(r.scopes), "roles": sorted(r.roles), "status": status(r),
                                "created_at": r.created_at, "expires_at": r.expires_at} for r in records]))
        return
    table = Table("key id", "name", "tenant", "scopes", "status", "expires")
    for r in records:
        exp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.expires_at)) if r.expires_at else "never"
        table.add_row(r.key_id, r.name, r.tenant, " ".join(sorted(r.scopes)), status(r), exp)
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (the 8 characters after pcl_).")],
                config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke a key; a running gateway refuses it within `keys.revocation_poll_seconds`."""
    from portcullis.keysadmin import revoke_key

    if not re.fullmatch(r"[0-9A-Za-z]{8}", key_id):
        raise fail("KEY_ID: expected the 8-character key id", 2)
    if not revoke_key(_data_dir(config, data_dir), key_id):
        raise fail(f"no active key with id {key_id}")
    typer.echo(f"revoked {key_id}")


@audit_app.command("tail")
def audit_tail(
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000, help="How many events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print the newest audit events."""
    from portcullis.audit.verify import format_event
    from portcullis.gateway import DataPaths, open_audit_store
    from portcullis.storage.engine import storage_for

    d = _data_dir(config, data_dir)
    # A directory bound to a shared database (`storage.url`) has no SQLite audit file.
    if storage_for(d).url is None and not DataPaths(d).audit_db.exists():
        raise fail(f"{d}: no audit log here")
    store = open_audit_store(d, writable=False)
    try:
        last = 0
        for ev in store.tail(lines):
            typer.echo(json.dumps(ev.to_dict()) if as_json else format_event(ev))
            last = ev.seq
        while follow:
            time.sleep(0.5)
            for ev in store.iter_events(after_seq=last):
                typer.echo(json.dumps(ev.to_dict()) if as_json else format_event(ev))
                last = ev.seq
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


@audit_app.command("verify")
def audit_verify(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Check the hash chain and signed checkpoints; exits 1 on any tampering."""
    from portcullis.audit.verify import verify
    from portcullis.gateway import DataPaths, open_audit_store
    from portcullis.storage.engine import storage_for

    d = _data_dir(config, data_dir)
    # A directory bound to a shared database (`storage.url`) has no SQLite audit file.
    if storage_for(d).url is None and not DataPaths(d).audit_db.exists():
        raise fail(f"{d}: no audit log here")
    store = open_audit_store(d, writable=False)
    try:
        if store.verify_key is None:
            raise fail(f"{DataPaths(d).audit_key} is missing: checkpoint signatures cannot be checked")
        report = verify(store, store.verify_key)
    finally:
        store.close()
    if report.ok:
        typer.echo(f"ok: {report.events_checked} events, chain and checkpoints intact")
        return
    for p in report.problems:
        typer.echo(f"TAMPERED: {p}", err=True)
    raise typer.Exit(1)


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Gateway port on 127.0.0.1.")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its state.")] = Path(".portcullis-demo"),
    credentials_out: Annotated[
        Path | None, typer.Option(help="Credentials file (default DATA_DIR/credentials.json).")
    ] = None,
    reset: Annotated[bool, typer.Option(help="Start over: delete the demo's data directory first.")] = False,
    upstream: Annotated[str | None, typer.Option(help="Send the demo routes to this upstream instead.")] = None,
    trust_issuer: Annotated[str | None, typer.Option(
        help="Also accept access tokens from this OpenID Connect issuer (found by discovery).")] = None,
    tenant_claim: Annotated[str, typer.Option(help="The token claim that names the tenant.")] = "tenant",
) -> None:
    """Run a complete gateway in front of the built-in demo SaaS API."""
    from portcullis.config import ConfigError
    from portcullis.demo.run import DemoError, prepare, quickstart, start_spa
    from portcullis.demo.upstream import DemoApi, UpstreamThread
    from portcullis.observe import configure_logging
    from portcullis.server import serve as run

    configure_logging("warning")
    thread: UpstreamThread | None = None
    if upstream is None:
        thread = UpstreamThread(DemoApi())
        thread.start()
        upstream_url = thread.url
    else:
        upstream_url = upstream
    try:
        try:
            loaded, creds, creds_path = prepare(data_dir, port, upstream_url, credentials_out, reset=reset,
                                                trust_issuer=trust_issuer, tenant_claim=tenant_claim)
        except ConfigError as exc:
            raise fail("; ".join(exc.errors)) from None
        except (DemoError, ValueError) as exc:
            raise fail(str(exc)) from None
        spa = start_spa(creds)
        typer.echo(quickstart(creds, creds_path, loaded.data_dir, spa_url=spa.url if spa else None))
        try:
            code = run(loaded)
        finally:
            if spa is not None:
                spa.stop()
    finally:
        if thread is not None:
            thread.stop()
    raise typer.Exit(code)


@app.command()
def sign(
    method: Annotated[str, typer.Argument(help="HTTP method.")],
    url: Annotated[str, typer.Argument(help="The full URL to call.")],
    credentials: Annotated[Path, typer.Option(help="A demo credentials file.")],
    client: Annotated[str, typer.Option(help="The client whose signing key and API key to use.")],
    data: Annotated[str | None, typer.Option(help="A request body (JSON).")] = None,
) -> None:
    """Print a curl command for an RFC 9421-signed request (as a partner would send it)."""
    from portcullis.signing_client import curl_command, signed_headers

    try:
        creds = json.loads(credentials.read_text())
        entry = next(c for c in creds.get("clients", []) if c.get("name") == client)
        signing = entry["signing"]
        api_key = entry["api_key"]
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        raise fail(f"{credentials}: no client {client!r} with a signing key and an API key") from None
    if not re.fullmatch(r"[A-Za-z]{3,10}", method):
        raise fail("METHOD: an HTTP method such as GET or POST", 2)
    if not url.startswith(("http://", "https://")):
        raise fail("URL: an absolute http:// or https:// URL", 2)
    body = data.encode() if data is not None else None
    headers = {"X-API-Key": api_key}
    if body:
        headers["Content-Type"] = "application/json"
    try:
        headers = signed_headers(method, url, private_key_pem=signing["private_key_pem"], key_id=signing["key_id"],
                                 body=body, extra_headers=headers)
    except (ValueError, TypeError) as exc:
        raise fail(f"cannot sign: {exc}") from None
    typer.echo(curl_command(method, url, headers, body))


@tokens_app.command("revoke")
def tokens_revoke(
    jti: Annotated[str | None, typer.Option(help="One token, by its `jti`.")] = None,
    sub: Annotated[str | None, typer.Option(help="Every token of this subject.")] = None,
    client: Annotated[str | None, typer.Option(help="Every token issued to this client.")] = None,
    for_: Annotated[str | None, typer.Option("--for", help="Lapse after this long (e.g. 1h); default never.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Refuse matching access tokens from now on (within `keys.revocation_poll_seconds`)."""
    from portcullis.keysadmin import revoke_tokens

    given = [(k, v) for k, v in (("jti", jti), ("sub", sub), ("client", client)) if v is not None]
    if len(given) != 1:
        raise fail("give exactly one of --jti, --sub or --client", 2)
    kind, value = given[0]
    if not value or len(value) > 512 or any(ord(c) < 32 for c in value):
        raise fail(f"--{kind}: 1-512 printable characters", 2)
    if len(reason) > 500:
        raise fail("--reason: at most 500 characters", 2)
    expires = time.time() + parse_duration(for_) if for_ else None
    d = _data_dir(config, data_dir)
    if not revoke_tokens(d, kind, value, expires_at=expires, reason=reason):  # type: ignore[arg-type]
        raise fail(f"{kind} {value!r} is already revoked")
    typer.echo(f"revoked tokens with {kind} {value!r}" + (f" until {time.ctime(expires)}" if expires else ""))


@tokens_app.command("revoked")
def tokens_revoked(config: ConfigOpt = None, data_dir: DataDirOpt = None,
                   as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the token revocations in force."""
    from portcullis.keysadmin import token_revocations

    entries = token_revocations(_data_dir(config, data_dir))
    if as_json:
        typer.echo(json.dumps([{"kind": e.kind, "value": e.value, "created_at": e.created_at,
                                "expires_at": e.expires_at, "reason": e.reason} for e in entries]))
        return
    for e in entries:
        until = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.expires_at)) if e.expires_at else "never"
        typer.echo(f"{e.kind:6} {e.value}  (until {until}) {e.reason}")


def main() -> None:
    """Entry point of the `portcullis` script."""
    import portcullis.cli_access  # registers `access` (and, with the next line, binds `portcullis`)
    import portcullis.cli_db
    import portcullis.cli_oauth
    import portcullis.cli_policy  # noqa: F401 - registers the authorization server's and policy commands
    from portcullis.audit.store import AuditStoreError
    from portcullis.gateway import SecretsError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except (SecretsError, AuditStoreError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
