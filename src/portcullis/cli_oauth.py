"""`portcullis tenants|clients|users|signing-keys|sessions`: the authorization server's
administration commands. Secrets (client secrets, generated passwords, TOTP secrets,
recovery codes) are printed once and never stored in the clear."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from portcullis.cli import ConfigOpt, DataDirOpt, app, fail

if TYPE_CHECKING:
    from portcullis.oauth.admin import Admin

from portcullis.oauth.models import MfaPolicy

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants of the authorization server and their MFA policy.")
clients_app = typer.Typer(no_args_is_help=True, help="Register, list and revoke OAuth clients.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(clients_app, name="clients")

MFA_POLICIES: dict[str, MfaPolicy] = {"optional": "optional", "required": "required",
                                      "phishing-resistant": "phishing_resistant"}


@contextmanager
def admin(config: Path | None, data_dir: Path | None) -> Iterator[Admin]:
    """Open the authorization server of `--config` or `--data-dir`; errors are one line."""
    from portcullis.oauth.admin import AdminError, config_for, open_auth

    if (config is None) == (data_dir is None):
        raise fail("give exactly one of --config FILE or --data-dir DIR", 2)
    try:
        handle = open_auth(config_for(config, data_dir))
    except AdminError as exc:
        raise fail(str(exc)) from None
    try:
        yield handle
    finally:
        handle.close()


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name (1-100 of A-Z a-z 0-9 . _ -).")],
    mfa: Annotated[str, typer.Option(help="optional | required | phishing-resistant (passkeys only).")] = "optional",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a tenant, or change its MFA policy."""
    from portcullis.config import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise fail(f"{name!r}: 1-100 of A-Z a-z 0-9 . _ -", 2)
    if mfa not in MFA_POLICIES:
        raise fail(f"--mfa: one of {', '.join(MFA_POLICIES)}", 2)
    with admin(config, data_dir) as h:
        new = h.ctx.clients.create_tenant(name, MFA_POLICIES[mfa])
    typer.echo(f"{'created' if new else 'updated'} tenant {name} (mfa: {mfa})")


@tenants_app.command("list")
def tenants_list(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """List tenants and their MFA policy."""
    import sqlalchemy as sa

    from portcullis.oauth import db

    with admin(config, data_dir) as h, h.ctx.db.engine.connect() as conn:
        rows = conn.execute(sa.select(db.tenants).order_by(db.tenants.c.name)).all()
    for r in rows:
        typer.echo(f"{r.name:30} mfa={r.mfa_policy}")


@clients_app.command("create")
def clients_create(
    name: Annotated[str, typer.Option(help="A unique name for the client.")],
    tenant: Annotated[str, typer.Option(help="The tenant the client belongs to.")],
    auth_method: Annotated[str, typer.Option(
        help="client_secret_basic | client_secret_post | private_key_jwt | tls_client_auth | "
             "self_signed_tls_client_auth | none (public client, PKCE)")] = "client_secret_basic",
    grant: Annotated[list[str] | None, typer.Option(
        help="authorization_code | client_credentials | refresh_token (repeat).")] = None,
    scope: Annotated[list[str] | None, typer.Option(help="A scope the client may ask for (repeat).")] = None,
    redirect_uri: Annotated[list[str] | None, typer.Option(help="An exact redirect URI (repeat).")] = None,
    jwks_file: Annotated[Path | None, typer.Option(help="The client's public JWK Set (private_key_jwt).")] = None,
    tls_subject_dn: Annotated[str | None, typer.Option(help="Certificate subject DN (tls_client_auth).")] = None,
    require_par: Annotated[bool, typer.Option(help="Authorization requests must be pushed (RFC 9126).")] = False,
    require_dpop: Annotated[bool, typer.Option(help="Tokens must be DPoP-bound (RFC 9449).")] = False,
    first_party: Annotated[bool, typer.Option(help="Skip the consent screen (your own apps only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a client. Its secret (if its method has one) is printed once."""
    from portcullis.oauth.models import ClientExistsError

    jwks = None
    if jwks_file is not None:
        try:
            raw = jwks_file.read_text()
            doc = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise fail(f"--jwks-file: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list) or len(raw) > 65536:
            raise fail("--jwks-file: a JWK Set ({\"keys\": [...]}) of at most 64 KiB", 2)
        if any(k.get("d") for k in doc["keys"] if isinstance(k, dict)):
            raise fail("--jwks-file: contains a private key; register only public keys", 2)
        jwks = json.dumps(doc, separators=(",", ":"))
    with admin(config, data_dir) as h:
        try:
            client, secret = h.ctx.clients.create_client(
                name=name, tenant=tenant, auth_method=auth_method, grant_types=grant or ["client_credentials"],
                scopes=scope or [], redirect_uris=redirect_uri or [], jwks=jwks, tls_subject_dn=tls_subject_dn,
                require_par=require_par, require_dpop=require_dpop, first_party=first_party)
        except ClientExistsError:
            raise fail(f"a client named {name!r} already exists") from None
        except ValueError as exc:
            raise fail(str(exc), 2) from None
    if as_json:
        typer.echo(json.dumps({"client_id": client.client_id, "client_secret": secret, "name": name}))
        return
    typer.echo(f"client_id      {client.client_id}")
    if secret:
        typer.echo(f"client_secret  {secret}")
        typer.echo("The secret is shown once; only its keyed hash is stored.", err=True)


@clients_app.command("list")
def clients_list(config: ConfigOpt = None, data_dir: DataDirOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List active clients (never their secrets)."""
    with admin(config, data_dir) as h:
        clients = h.ctx.clients.all()
    docs = [{"client_id": c.client_id, "name": c.name, "tenant": c.tenant, "auth_method": c.auth_method,
             "grant_types": list(c.grant_types), "scopes": list(c.scopes), "redirect_uris": list(c.redirect_uris),
             "require_par": c.require_par, "require_dpop": c.require_dpop, "first_party": c.first_party}
            for c in clients]
    if as_json:
        typer.echo(json.dumps(docs))
        return
    for c in clients:
        typer.echo(f"{c.client_id:28} {c.name:24} tenant={c.tenant} {c.auth_method} grants={','.join(c.grant_types)}")


@clients_app.command("revoke")
def clients_revoke(client_id: Annotated[str, typer.Argument(help="The client_id.")],
                   config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Disable a client and refuse every token issued to it (within a second)."""
    import time

    from portcullis.storage.protocols import RevocationRecord

    with admin(config, data_dir) as h:
        if not h.ctx.clients.revoke_client(client_id):
            raise fail(f"no active client {client_id!r}")
        h.ctx.revocations.revoke_tokens(RevocationRecord(
            "client", client_id, time.time(), None, "client revoked"))
    typer.echo(f"revoked client {client_id} and every token issued to it")
