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
    from portcullis.oauth.identity.users import Users

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
    mfa: Annotated[str | None, typer.Option(
        help="optional | required | phishing-resistant (passkeys only); a new tenant defaults to optional, "
             "an existing one keeps its policy unless given.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a tenant, or change its MFA policy."""
    from portcullis.config import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise fail(f"{name!r}: 1-100 of A-Z a-z 0-9 . _ -", 2)
    if mfa is not None and mfa not in MFA_POLICIES:
        raise fail(f"--mfa: one of {', '.join(MFA_POLICIES)}", 2)
    with admin(config, data_dir) as h:
        new = h.ctx.clients.create_tenant(name, MFA_POLICIES[mfa] if mfa else None)
        policy = h.ctx.clients.tenant_policy(name)
        h.record("admin.tenant_created" if new else "admin.tenant_updated", tenant=name, extra={"mfa": policy})
    shown = next((k for k, v in MFA_POLICIES.items() if v == policy), "?")
    typer.echo(f"{'created' if new else 'updated'} tenant {name} (mfa: {shown})")


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
        h.record("admin.client_created", tenant=tenant, credential_id=client.client_id,
                 extra={"name": name, "auth_method": auth_method, "grant_types": list(client.grant_types)})
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

    from portcullis.oauth.authorize import grants_for
    from portcullis.storage.protocols import RevocationRecord

    with admin(config, data_dir) as h:
        if not h.ctx.clients.revoke_client(client_id):
            raise fail(f"no active client {client_id!r}")
        h.ctx.revocations.revoke_tokens(RevocationRecord(
            "client", client_id, time.time(), None, "client revoked"))
        families = grants_for(h.ctx).revoke_client(client_id)
        h.record("admin.client_revoked", credential_id=client_id, extra={"refresh_families": families})
    typer.echo(f"revoked client {client_id} and every token issued to it")


users_app = typer.Typer(no_args_is_help=True, help="Users of the authorization server: create, MFA, disable.")
signing_app = typer.Typer(no_args_is_help=True, help="The authorization server's token signing keys.")
sessions_app = typer.Typer(no_args_is_help=True, help="Browser sessions of the authorization server.")
app.add_typer(users_app, name="users")
app.add_typer(signing_app, name="signing-keys")
app.add_typer(sessions_app, name="sessions")

PasswordFileOpt = Annotated[Path | None, typer.Option(
    help="Read the password from this file ('-' for stdin); default: generate one and print it once.")]


def _read_password(password_file: Path | None) -> tuple[str, bool]:
    """(password, generated?) from a file, stdin or a fresh random one."""
    import secrets
    import sys

    if password_file is None:
        return "-".join(secrets.token_urlsafe(6) for _ in range(3)), True
    try:
        text = sys.stdin.read(4096) if str(password_file) == "-" else password_file.read_text()[:4096]
    except OSError as exc:
        raise fail(f"--password-file: {exc}") from None
    return text.rstrip("\r\n"), False


def _user_or_fail(users: Users, username: str) -> str:
    u = users.by_username(username)
    if u is None:
        raise fail(f"no user {username!r}")
    return u.user_id


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="Email-like login name (unique).")],
    tenant: Annotated[str, typer.Option(help="The user's tenant.")],
    role: Annotated[list[str] | None, typer.Option(help="A role (repeat).")] = None,
    password_file: PasswordFileOpt = None,
    totp: Annotated[bool, typer.Option(help="Enrol TOTP now and print its secret once.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a user. Common and breached passwords are refused."""
    from portcullis.oauth.identity.passwords import WeakPasswordError
    from portcullis.oauth.identity.users import UserExistsError, Users

    password, generated = _read_password(password_file)
    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        try:
            user = users.create(tenant, username, password, role or [])
        except UserExistsError:
            raise fail(f"a user {username!r} already exists") from None
        except WeakPasswordError as exc:
            raise fail(f"password refused: {exc}", 2) from None
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        secret = users.enroll_totp(user.user_id) if totp else None
        h.record("admin.user_created", tenant=tenant, credential_id=user.user_id,
                 extra={"username": user.username, "roles": list(user.roles), "totp": bool(secret)})
    typer.echo(f"user_id   {user.user_id}")
    if generated:
        typer.echo(f"password  {password}")
    if secret:
        typer.echo(f"totp      {secret}")
    if generated or secret:
        typer.echo("Secrets are shown once; only hashes (password) and ciphertext (TOTP) are stored.", err=True)


@users_app.command("list")
def users_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's users.")] = None,
               config: ConfigOpt = None, data_dir: DataDirOpt = None,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List users (never their secrets)."""
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        rows = [(u, users.passkey_count(u.user_id)) for u in users.list(tenant)]
    docs = [{"user_id": u.user_id, "username": u.username, "tenant": u.tenant, "roles": list(u.roles),
             "totp": u.has_totp, "passkeys": n, "active": u.active} for u, n in rows]
    if as_json:
        typer.echo(json.dumps(docs))
        return
    for u, n in rows:
        typer.echo(f"{u.username:32} tenant={u.tenant} roles={','.join(u.roles) or '-'} "
                   f"totp={'yes' if u.has_totp else 'no'} passkeys={n} {'active' if u.active else 'disabled'}")


@users_app.command("disable")
def users_disable(username: Annotated[str, typer.Argument(help="The user.")],
                  config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Disable a user, end their sessions and revoke the apps they granted (refresh tokens and
    the access tokens issued from them)."""
    from portcullis.oauth.authorize import revoke_user_grants
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        uid = _user_or_fail(users, username)
        ended = users.revoke_sessions(uid)
        if not users.disable(uid):
            raise fail(f"{username!r} is already disabled")
        grants = revoke_user_grants(h.ctx, uid)
        h.record("admin.user_disabled", credential_id=uid, extra={"sessions_ended": ended, "grants": grants})
    typer.echo(f"disabled {username} ({ended} sessions ended, {grants} app grants revoked)")


@users_app.command("enroll-totp")
def users_enroll_totp(username: Annotated[str, typer.Argument(help="The user.")],
                      config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Replace the user's TOTP secret with a new one, printed once."""
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        uid = _user_or_fail(users, username)
        secret = users.enroll_totp(uid)
        h.record("admin.user_totp_enrolled", credential_id=uid)
    typer.echo(secret)


@users_app.command("recovery-codes")
def users_recovery_codes(username: Annotated[str, typer.Argument(help="The user.")],
                         config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Replace the user's recovery codes with 10 new single-use ones, printed once."""
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        uid = _user_or_fail(users, username)
        codes = users.new_recovery_codes(uid)
        h.record("admin.user_recovery_codes", credential_id=uid)
    typer.echo("\n".join(codes))


@users_app.command("revoke-grants")
def users_revoke_grants(username: Annotated[str, typer.Argument(help="The user.")],
                        client: Annotated[str | None, typer.Option(help="Only this client_id's grant.")] = None,
                        config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Revoke the apps a user granted: consent, refresh tokens and the access tokens issued
    from them (the gateway refuses those within a second)."""
    from portcullis.oauth.authorize import revoke_user_grants
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        uid = _user_or_fail(Users(h.ctx), username)
        n = revoke_user_grants(h.ctx, uid, client)
        h.record("admin.grants_revoked", credential_id=uid, extra={"client_id": client, "grants": n})
    typer.echo(f"revoked {n} app grants of {username}")


@users_app.command("unlock")
def users_unlock(username: Annotated[str, typer.Argument(help="The user (as typed at the login form).")],
                 config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Lift a login lock and its delays now (they also lift by themselves)."""
    from portcullis.oauth.identity import identity_of

    with admin(config, data_dir) as h:
        lifted = identity_of(h.ctx).throttle.unlock(username)
        h.record("admin.user_unlocked", extra={"username": username, "was_throttled": lifted})
    typer.echo(f"{username}: {'unlocked' if lifted else 'was not throttled'}")


@sessions_app.command("revoke")
def sessions_revoke(username: Annotated[str, typer.Argument(help="End every browser session of this user.")],
                    config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Log a user out everywhere (their apps' refresh tokens: `portcullis users revoke-grants`)."""
    from portcullis.oauth.identity.users import Users

    with admin(config, data_dir) as h:
        users = Users(h.ctx)
        uid = _user_or_fail(users, username)
        ended = users.revoke_sessions(uid)
        h.record("admin.sessions_revoked", credential_id=uid, extra={"sessions_ended": ended})
    typer.echo(f"ended {ended} sessions of {username}")


@signing_app.command("rotate")
def signing_rotate(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Make a new current signing key now; the old one stays published until its tokens expire."""
    from portcullis.oauth.keys import Keyring

    with admin(config, data_dir) as h:
        kid = Keyring(h.ctx.cfg, h.ctx.db, h.ctx.secrets_dir).rotate()
        h.record("admin.signing_key_rotated", credential_id=kid)
    typer.echo(f"new signing key {kid}; running gateways pick it up within a second")


@signing_app.command("list")
def signing_list(config: ConfigOpt = None, data_dir: DataDirOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List published signing keys (public parts only)."""
    import time

    from portcullis.oauth.keys import Keyring

    with admin(config, data_dir) as h:
        ring = Keyring(h.ctx.cfg, h.ctx.db, h.ctx.secrets_dir)
        rows, current = ring.rows(), ring.current_kid()
    docs = [{"kid": r.kid, "alg": r.alg, "created_at": r.created_at, "retired_at": r.retired_at,
             "current": r.kid == current} for r in rows]
    if as_json:
        typer.echo(json.dumps(docs))
        return
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created_at))
        state = "current" if r.kid == current else ("retired" if r.retired_at else "published")
        typer.echo(f"{r.kid}  {r.alg}  created {created}  {state}")
