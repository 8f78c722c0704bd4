"""`portcullis db upgrade|current|check`: the stores' schema under Alembic
(`portcullis.storage.migrations`), for the database a config's `storage:` names or, by
default, the SQLite files of the data directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from portcullis.cli import _load_or_exit, app, fail

if TYPE_CHECKING:
    import sqlalchemy as sa

    from portcullis.storage.migrations import Branch

    Target = tuple[str, sa.Engine, list[Branch]]

db_app = typer.Typer(no_args_is_help=True, help="Migrate and check the stores' database schema.")
app.add_typer(db_app, name="db")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Gateway config file.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="A data directory (e.g. a demo's).")]


@contextmanager
def _targets(config: Path | None, data_dir: Path | None, *, create: bool) -> Iterator[list[Target]]:
    """(label, engine, branches) for every database holding stores; engines disposed after."""
    from portcullis.storage.engine import StorageError, bind_data_dir, make_engine, sqlite_file_url, storage_for
    from portcullis.storage.migrations import BRANCHES, DEFAULT_FILES

    if (config is None) == (data_dir is None):
        raise fail("give exactly one of --config FILE or --data-dir DIR", 2)
    try:
        if config is not None:
            loaded = _load_or_exit(config)
            d = loaded.data_dir
            storage = bind_data_dir(d, loaded.config.storage) if create else (
                loaded.config.storage or storage_for(d))
        else:
            assert data_dir is not None
            if not data_dir.is_dir():
                raise fail(f"{data_dir}: no such directory")
            d = data_dir.resolve()
            storage = storage_for(d)
    except StorageError as exc:
        raise fail(str(exc)) from None
    engines: list[sa.Engine] = []
    targets: list[Target] = []
    try:
        if storage.url is not None:
            engines.append(make_engine(storage.url, storage))
            targets.append((storage.redacted_url(), engines[-1], list(BRANCHES)))
        else:
            for branch, name in DEFAULT_FILES.items():
                path = d / name
                if not path.exists():
                    if not create:
                        continue
                    d.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # born 0600, like the stores'
                engines.append(make_engine(sqlite_file_url(path), storage))
                targets.append((str(path), engines[-1], [branch]))
        yield targets
    finally:
        for engine in engines:
            engine.dispose()


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Apply every pending migration (creates the schema in an empty database; a database
    made by an earlier version is upgraded in place). Safe to run on several nodes at once."""
    import sqlalchemy as sa

    from portcullis.storage.migrations import state, upgrade

    with _targets(config, data_dir, create=True) as targets:
        for label, engine, branches in targets:
            try:
                upgrade(engine, branches)
            except sa.exc.SQLAlchemyError as exc:
                raise fail(f"{label}: upgrade failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
            typer.echo(f"{label}: at {', '.join(sorted(state(engine, branches).current))}")


@db_app.command("current")
def db_current(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print each database's revisions and whether it is up to date."""

    from portcullis.storage.migrations import state

    with _targets(config, data_dir, create=False) as targets:
        if not targets:
            raise fail("no stores here yet (run the gateway or `portcullis db upgrade`)")
        for label, engine, branches in targets:
            st = state(engine, branches)
            at = ", ".join(sorted(st.current)) or "not versioned (run `portcullis db upgrade`)"
            typer.echo(f"{label}: {at} ({'up to date' if st.up_to_date else 'behind: ' + ', '.join(sorted(st.heads))})")


@db_app.command("check")
def db_check(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Exit non-zero unless every database is at the newest revision and its tables match
    the code's exactly (a CI or deployment gate)."""

    from portcullis.storage.migrations import diff, state

    problems = 0
    with _targets(config, data_dir, create=False) as targets:
        if not targets:
            raise fail("no stores here yet (run the gateway or `portcullis db upgrade`)")
        for label, engine, branches in targets:
            st = state(engine, branches)
            if not st.up_to_date:
                problems += 1
                typer.echo(f"{label}: behind (at {', '.join(sorted(st.current)) or 'none'}, "
                           f"want {', '.join(sorted(st.heads))}); run `portcullis db upgrade`", err=True)
                continue
            differences = diff(engine, branches)
            for d in differences:
                problems += 1
                typer.echo(f"{label}: schema differs from the code: {d}", err=True)
            if not differences:
                typer.echo(f"{label}: ok")
    if problems:
        raise typer.Exit(1)
