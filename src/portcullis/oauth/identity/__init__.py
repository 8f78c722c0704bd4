"""The identity side of the authorization server: users, argon2id passwords, TOTP,
passkeys, recovery codes, sessions, CSRF, login throttling and the account pages.

`install(ctx)` sets `ctx.sessions` (the `Identity`, which implements the `Sessions`
protocol) and registers the `/account/...` routes. `Users(ctx)` (users.py) is the
directory the CLI and demo seeding use; `Csrf` (csrf.py) is for other areas' forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portcullis.oauth.identity import tables  # noqa: F401 - declares the tables on db.metadata

if TYPE_CHECKING:
    from portcullis.oauth.identity.pages import Identity
    from portcullis.oauth.service import AuthContext


def install(ctx: AuthContext) -> Identity:
    """Register the identity pages and set `ctx.sessions`."""
    from portcullis.oauth.identity.pages import Identity

    identity = Identity(ctx)
    identity.register(ctx.routes)
    ctx.sessions = identity
    return identity


def identity_of(ctx: AuthContext) -> Identity:
    """The installed `Identity` of a context (tests, CLI)."""
    from portcullis.oauth.identity.pages import Identity

    if not isinstance(ctx.sessions, Identity):
        raise RuntimeError("the identity side is not installed")
    return ctx.sessions
