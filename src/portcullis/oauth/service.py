"""Assembles the authorization server: stores, Authlib core, extensions, pages.

Each area installs itself into an `AuthContext` (no module-level singletons): the
identity pages (`identity.install`), the token side (`tokens.install`: keys, client
authentication, client credentials, DPoP, introspection, revocation, discovery) and the
browser flow (`authorize.install`: code + PKCE, PAR, refresh rotation, consent).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from portcullis.credentials.apikeys import KeyHasher
from portcullis.netutil import TrustedProxies
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.db import AuthDb
from portcullis.oauth.http import AsRoutes, AuthServerStage
from portcullis.oauth.models import ClientDirectory, Sessions
from portcullis.oauth.server import AuthorizationServer
from portcullis.storage.protocols import RevocationStore
from portcullis.traffic.protocols import ReplayCache

Hook = Callable[[], Awaitable[None]]
#: Revokes a token the server issued if it is one of the area's (e.g. a refresh token):
#: (token, requesting client_id) -> True when it was recognised (RFC 7009 §2.1).
TokenRevoker = Callable[[str, str], bool]
#: Introspects a token if it is one of the area's: (token) -> RFC 7662 §2.2 document, or None.
TokenIntrospector = Callable[[str], "dict[str, Any] | None"]


class SigningKeys(Protocol):
    """The issuer's signing keys (oauth/keys.py): sign with the current key, publish all
    keys still needed to verify (RFC 7517)."""

    @property
    def alg(self) -> str: ...

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        """A compact JWS of `claims` under the current key (`kid`, `alg`, `typ` in the header)."""
        ...

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: the current key and every retired key not yet expired."""
        ...


@dataclass
class AuthContext:
    """What the installers share. `keys` and `sessions` are set by the installers that
    own them (tokens, identity) before those that use them run."""

    cfg: AuthServerConfig
    data_dir: Path
    db: AuthDb
    clients: ClientDirectory
    server: AuthorizationServer
    routes: AsRoutes
    hasher: KeyHasher
    revocations: RevocationStore
    trusted: TrustedProxies
    clock: Callable[[], float] = time.time
    keys: SigningKeys | None = None
    sessions: Sessions | None = None
    # Replay caches shared by every node (Redis), when configured: DPoP proofs at the
    # token endpoint. None: the in-process caches only (one node).
    replay: ReplayCache | None = None
    # Discovery metadata (RFC 8414 §2, OIDC Discovery §3): each area adds its endpoints
    # and capabilities; the discovery documents serve the merged dict.
    metadata: dict[str, Any] = field(default_factory=dict)
    token_revokers: list[TokenRevoker] = field(default_factory=list)
    token_introspectors: list[TokenIntrospector] = field(default_factory=list)
    startup: list[Hook] = field(default_factory=list)
    shutdown: list[Hook] = field(default_factory=list)

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    def require_keys(self) -> SigningKeys:
        if self.keys is None:
            raise RuntimeError("the token side must be installed first")
        return self.keys

    def require_sessions(self) -> Sessions:
        if self.sessions is None:
            raise RuntimeError("the identity side must be installed first")
        return self.sessions


@dataclass
class AuthServer:
    """A built authorization server: the stage to mount and its lifecycle hooks."""

    ctx: AuthContext
    stage: AuthServerStage

    async def start(self) -> None:
        for hook in self.ctx.startup:
            await hook()

    async def stop(self) -> None:
        for hook in self.ctx.shutdown:
            await hook()
        self.ctx.db.close()


def auth_db_path(data_dir: Path) -> Path:
    return data_dir / "oauth.db"


def open_context(cfg: AuthServerConfig, data_dir: Path, hasher: KeyHasher, revocations: RevocationStore, *,
                 trusted: TrustedProxies | None = None, clock: Callable[[], float] = time.time) -> AuthContext:
    """Open the store (creating every table) and the Authlib core, nothing installed yet."""
    # Importing the areas declares their tables on `db.metadata` before AuthDb creates them.
    from portcullis.oauth import authorize, identity, tokens  # noqa: F401

    adb = AuthDb(auth_db_path(data_dir))
    clients = ClientDirectory(adb, hasher)
    server = AuthorizationServer(clients)
    return AuthContext(cfg=cfg, data_dir=data_dir, db=adb, clients=clients, server=server, routes=AsRoutes(),
                       hasher=hasher, revocations=revocations, trusted=trusted or TrustedProxies([]), clock=clock)


def build_auth_server(cfg: AuthServerConfig, data_dir: Path, hasher: KeyHasher, revocations: RevocationStore,
                      *, trusted: TrustedProxies | None = None, client_cert_header: str | None = None,
                      clock: Callable[[], float] = time.time, replay: ReplayCache | None = None) -> AuthServer:
    """The whole server over `data_dir`, ready to mount after the normalize stage."""
    from portcullis.oauth import authorize, identity, tokens

    ctx = open_context(cfg, data_dir, hasher, revocations, trusted=trusted, clock=clock)
    ctx.replay = replay
    identity.install(ctx)
    tokens.install(ctx)
    authorize.install(ctx)
    stage = AuthServerStage(ctx.routes, cfg.issuer, ctx.trusted, client_cert_header)
    return AuthServer(ctx, stage)
