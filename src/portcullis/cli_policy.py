"""`portcullis policy test|explain`: Cedar policies checked the way an operator's CI and an
on-call engineer need them. The logic lives in `portcullis.policy.testing`."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from portcullis.cli import _load_or_exit, app, fail

if TYPE_CHECKING:
    from portcullis.policy.config import PolicyConfig
    from portcullis.policy.mapping import RouteLike

policy_app = typer.Typer(no_args_is_help=True, help="Test Cedar policies and explain decisions.")
app.add_typer(policy_app, name="policy")

SetupOpt = Annotated[Path | None, typer.Option(
    "--setup", help="A standalone file with `policy:` and `routes:` (default: DIR/policy.yaml).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="A gateway config with a `policy:` section.")]
AtOpt = Annotated[str | None, typer.Option(
    "--at", help="Decide at this time (ISO 8601, e.g. 2026-11-30T10:00:00+01:00).")]


def _setup(config: Path | None, setup: Path | None, default_dir: Path | None) -> tuple[PolicyConfig, list[RouteLike],
                                                                                         Path | None]:
    """(policy config, routes, policy dir) from a gateway config or a standalone setup file."""
    from pydantic import ValidationError

    from portcullis.policy.testing import load_setup

    if config is not None and setup is not None:
        raise fail("give at most one of --config or --setup", 2)
    if config is not None:
        loaded = _load_or_exit(config)
        pcfg = loaded.config.policy
        if pcfg is None:
            raise fail(f"{config}: no policy: section")
        return pcfg, list(loaded.config.routes), pcfg.resolve_dir(config.resolve().parent)
    path = setup or (default_dir / "policy.yaml" if default_dir else None)
    if path is None or not path.is_file():
        raise fail(f"{path or '--setup'}: no such setup file (give --setup FILE or --config FILE)")
    try:
        pcfg, routes = load_setup(path)
    except ValidationError as exc:
        raise fail(f"{path}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors(include_url=False))) from None
    except (ValueError, KeyError, TypeError, OSError, yaml.YAMLError) as exc:
        raise fail(f"{path}: {type(exc).__name__}: {exc}") from None
    return pcfg, list(routes), pcfg.resolve_dir(path.resolve().parent)


def _when(at: str | None) -> float:
    if at is None:
        return time.time()
    try:
        dt = datetime.fromisoformat(at)
    except ValueError:
        raise fail(f"--at: {at!r} is not an ISO 8601 time", 2) from None
    if dt.tzinfo is None:
        raise fail("--at: give a UTC offset (e.g. +00:00) so the time is unambiguous", 2)
    return dt.timestamp()


@policy_app.command("test")
def policy_test(
    directory: Annotated[Path, typer.Argument(help="The policy directory (its *.test.yaml and tests/*.yaml).")],
    setup: SetupOpt = None,
    config: ConfigOpt = None,
    at: AtOpt = None,
) -> None:
    """Run the YAML policy test cases of DIR; exits 1 when any case fails (for CI). Cases
    without a `time` are decided at --at, by default the Unix epoch (a fixed instant, so a
    CI run does not depend on when it runs)."""
    from portcullis.policy.testing import run_dir

    if not directory.is_dir():
        raise fail(f"{directory}: no such directory", 2)
    pcfg, routes, _ = _setup(config, setup, directory)
    report = run_dir(directory, pcfg, routes, now=_when(at) if at else 0.0)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(1)


@policy_app.command("explain")
def policy_explain(
    request: Annotated[Path, typer.Argument(help="A YAML/JSON request description ('-' for stdin).")],
    setup: SetupOpt = None,
    config: ConfigOpt = None,
    at: AtOpt = None,
) -> None:
    """Why a described request (principal, action, path, resource, context) would be
    allowed or denied: the decision and the policies that determined it (at --at, by
    default now). Exits 2 when the description is invalid."""
    import sys

    from portcullis.policy.engine import PolicyEngine, PolicyError
    from portcullis.policy.testing import explain

    try:
        text = sys.stdin.read(1 << 20) if str(request) == "-" else request.read_text()[: 1 << 20]
        doc: Any = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"{request}: cannot read ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise fail(f"{request}: expected a mapping (principal, action, ...)", 2)
    pcfg, routes, policy_dir = _setup(config, setup, None if config or setup else Path.cwd())
    try:
        engine = PolicyEngine(pcfg, routes, policy_dir)
    except PolicyError as exc:
        for p in exc.problems:
            typer.echo(f"policy: {p}", err=True)
        raise typer.Exit(1) from None
    text = explain(engine, doc, now=_when(at))
    if text.startswith("invalid request description"):
        raise fail(text, 2)
    typer.echo(text)


__all__ = ["policy_app"]
