"""Builds a running gateway from a validated config: stores, stages, pipeline, app."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

from portcullis import __version__
from portcullis.app import GatewayApp
from portcullis.audit.keys import load_or_create_audit_key
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.writer import AuditWriter
from portcullis.config import LoadedConfig
from portcullis.credentials.apikeys import KeyHasher
from portcullis.credentials.introspection import Introspector
from portcullis.credentials.jwt import JwtConfig, JwtVerifier
from portcullis.credentials.rfc9449 import DpopConfig, DpopNonces, DpopVerifier
from portcullis.forward_auth import DecisionApp, build_decision_app
from portcullis.governance.service import Governance, open_governance
from portcullis.netutil import TrustedProxies
from portcullis.oauth import tokens
from portcullis.oauth.service import AuthServer, build_auth_server
from portcullis.observe import Metrics, MetricsStage
from portcullis.pipeline import CompletionStage, Pipeline, Stage
from portcullis.policy.engine import PolicyEngine
from portcullis.policy.owners import AnyOwnerSource, UpstreamOwnerSource, build_owner_source
from portcullis.secretfile import create_once
from portcullis.stages.authenticate import AuthenticateStage, KeyCache
from portcullis.stages.authorize import AuthorizeStage
from portcullis.stages.limit import LimitStage
from portcullis.stages.normalize import NormalizeStage
from portcullis.stages.policy import PolicyStage
from portcullis.stages.proxy import ProxyStage, Upstream
from portcullis.stages.record import RecordStage
from portcullis.stages.route import Router, RouteStage
from portcullis.stages.signature import SignatureStage
from portcullis.storage.sqlite_keys import SqliteKeyStore
from portcullis.traffic.gcra import MemoryGcra


@dataclass(frozen=True)
class DataPaths:
    """Where a gateway keeps its state, under its data directory."""

    root: Path

    @property
    def keys_db(self) -> Path:
        return self.root / "portcullis.db"

    @property
    def audit_db(self) -> Path:
        return self.root / "audit.db"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def pepper(self) -> Path:
        return self.secrets_dir / "key-pepper"

    @property
    def audit_key(self) -> Path:
        return self.secrets_dir / "audit-ed25519.pem"

    @property
    def dpop_nonce_key(self) -> Path:
        return self.secrets_dir / "dpop-nonce-key"


class SecretsError(Exception):
    """A secret the data directory needs is missing or unusable; the message says what to do."""


def load_or_create_secret(path: Path) -> bytes:
    """32 random bytes kept in `path` (0600); losing them only invalidates short-lived state."""
    if path.exists() and len(data := path.read_bytes()) >= 32:
        return data
    path.unlink(missing_ok=True)  # too short to be ours: replace it
    create_once(path, secrets.token_bytes(32))
    return path.read_bytes()


def load_or_create_pepper(path: Path, *, may_create: bool = True) -> bytes:
    """The server pepper for API key hashes: 32 random bytes, created once, mode 0600.

    Losing it invalidates every API key (by design: the hashes are useless without
    it), so it is only created where no key store exists yet (`may_create`).
    """
    if path.exists():
        data = path.read_bytes()
        if len(data) < 32:
            raise SecretsError(f"{path}: the key pepper is shorter than 32 bytes; restore it from a backup")
        return data
    if not may_create:
        raise SecretsError(f"{path} is missing but the key store exists: every API key would fail. "
                           "Restore the file from a backup (or move the data directory aside to start over).")
    create_once(path, secrets.token_bytes(32))
    return path.read_bytes()


def _ensure_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)


def open_key_store(data_dir: Path, *, create: bool = True) -> tuple[SqliteKeyStore, KeyHasher]:
    """The key store and its hasher; creates both only in a fresh data directory, and
    only when `create` (commands that merely read or revoke never make a new store)."""
    paths = DataPaths(data_dir)
    if not create and not paths.keys_db.exists():
        raise SecretsError(f"{data_dir}: no key store here (is this the gateway's data directory?)")
    _ensure_dir(data_dir)
    pepper = load_or_create_pepper(paths.pepper, may_create=not paths.keys_db.exists())
    return SqliteKeyStore(paths.keys_db), KeyHasher(pepper)


def open_audit_store(data_dir: Path, *, writable: bool = True) -> SqliteAuditStore:
    """The audit log. Writable: with its signing key (created only for a new log).
    Read-only (tail, verify): never creates anything; the verify key is the signing
    key's public half when the key file is there, else None."""
    paths = DataPaths(data_dir)
    if not writable:
        key = load_or_create_audit_key(paths.audit_key) if paths.audit_key.exists() else None
        return SqliteAuditStore(paths.audit_db, verify_key=key.public_key() if key else None)
    _ensure_dir(data_dir)
    if paths.audit_db.exists() and not paths.audit_key.exists():
        raise SecretsError(f"{paths.audit_key} is missing but the audit log exists: new checkpoints would not "
                           "verify. Restore the key from a backup.")
    key = load_or_create_audit_key(paths.audit_key)
    return SqliteAuditStore(paths.audit_db, signing_key=key, verify_key=key.public_key())


def resolve_jwks_files(cfg: JwtConfig, config_path: Path | None) -> JwtConfig:
    """`jwks_file` names relative to the config file's directory, like `data_dir`."""
    if config_path is None:
        return cfg
    base = config_path.parent
    issuers = [i.model_copy(update={"jwks_file": str((base / i.jwks_file).resolve())})
               if i.jwks_file is not None and not Path(i.jwks_file).is_absolute() else i for i in cfg.issuers]
    return cfg.model_copy(update={"issuers": issuers})


@dataclass
class Gateway:
    """Everything a served config needs, wired; `app` is the ASGI callable."""

    app: GatewayApp
    metrics: Metrics
    writer: AuditWriter
    keys: KeyCache
    upstreams: dict[str, Upstream]
    auth_server: AuthServer | None = None
    # The forward-auth decision app (its own listener; `server.make_server` serves it).
    decision_app: DecisionApp | None = None


def load_policy(loaded: LoadedConfig) -> PolicyEngine | None:
    """The Cedar engine of a config's `policy:` section (None without one); raises
    `PolicyError` naming each problem (file, line) when a policy or the schema is invalid."""
    pcfg = loaded.config.policy
    if pcfg is None:
        return None
    base = loaded.path.parent if loaded.path else Path.cwd()
    return PolicyEngine(pcfg, list(loaded.config.routes), pcfg.resolve_dir(base))


def build_gateway(loaded: LoadedConfig) -> Gateway:
    """Open the stores and assemble the pipeline in DESIGN.md's order."""
    cfg = loaded.config
    data_dir = loaded.data_dir
    engine = load_policy(loaded)  # before any store is opened: a bad policy opens nothing
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_store, hasher = open_key_store(data_dir)
    audit_store = open_audit_store(data_dir)
    metrics = Metrics()
    writer = AuditWriter(audit_store, max_batch=cfg.audit.max_batch, max_backlog=cfg.audit.max_backlog)
    keys = KeyCache(key_store, interval=cfg.keys.revocation_poll_seconds, revocations=key_store)
    trusted = TrustedProxies(cfg.normalize.trusted_proxies)
    upstreams = {name: Upstream(name, u) for name, u in cfg.upstreams.items()}
    ic = cfg.introspection
    if ic is not None and ic.client_secret_file and loaded.path and not Path(ic.client_secret_file).is_absolute():
        ic = ic.model_copy(update={"client_secret_file": str(loaded.path.parent / ic.client_secret_file)})
    introspector = Introspector(ic) if ic is not None else None
    dpop_nonces = dpop = None
    # The built-in authorization server issues DPoP-bound tokens (RFC 9449), so with it
    # the gateway accepts DPoP proofs by default (`dpop:` tunes or tightens this).
    dpop_cfg = cfg.dpop or (DpopConfig() if cfg.auth_server is not None else None)
    if dpop_cfg is not None:
        # Nonces are HMACs under a per-data-directory secret: processes sharing the
        # directory accept each other's nonces (RFC 9449 §8).
        dpop_nonces = DpopNonces(load_or_create_secret(DataPaths(data_dir).dpop_nonce_key),
                                 dpop_cfg.nonce_lifetime_seconds)
        dpop = DpopVerifier(dpop_cfg, nonces=dpop_nonces)
    auth_server: AuthServer | None = None
    if cfg.auth_server is not None:
        auth_server = build_auth_server(cfg.auth_server, data_dir, hasher, key_store, trusted=trusted,
                                        client_cert_header=cfg.normalize.client_cert_header)
    jwt = JwtVerifier(resolve_jwks_files(cfg.jwt, loaded.path)) if cfg.jwt is not None else None
    if auth_server is not None:
        # The gateway trusts its own issuer, with the keys from the keyring in-process
        # (no HTTP to itself; a rotated key is known at once).
        own = tokens.gateway_key_source(auth_server.ctx)
        jwt = jwt or JwtVerifier(JwtConfig(issuers=[own.cfg]))
        jwt.add_issuer(own)
    policy: PolicyStage | None = None
    governance: Governance | None = None
    owners: dict[str, AnyOwnerSource] = {}
    if engine is not None and cfg.policy is not None:
        base = loaded.path.parent if loaded.path else Path.cwd()
        owners = {name: build_owner_source(src, base) for name, src in cfg.policy.owner_sources.items()}
        # Roles granted through governance (standing, just-in-time, break-glass) join the
        # principal's own; they lapse by themselves (`access` CLI, issue 5).
        governance = open_governance(data_dir, cfg.governance.resolved(base))
        policy = PolicyStage(engine, cfg.policy, owners, governance)
    record = RecordStage(writer)
    rid_header = cfg.normalize.request_id_header.lower().encode()
    default_key_limit = cfg.keys.default_rate_limit.spec() if cfg.keys.default_rate_limit else None
    stages: list[Stage] = [
        record,  # admission: refuse when the audit log cannot keep up (fail closed)
        NormalizeStage(cfg.normalize, trusted),
        # The authorization server answers its own paths on this origin (issue 4).
        *([auth_server.stage] if auth_server is not None else []),
        RouteStage(Router(list(cfg.routes))),
        AuthenticateStage(keys, hasher, jwt=jwt, introspector=introspector, trusted=trusted,
                          client_cert_header=cfg.normalize.client_cert_header, dpop=dpop, dpop_nonces=dpop_nonces,
                          signatures_enabled=cfg.signatures is not None),
        *([SignatureStage(cfg.signatures, cfg.normalize.max_body_bytes,
                          loaded.path.parent if loaded.path else None, trusted)] if cfg.signatures else []),
        AuthorizeStage(),
        *([policy] if policy is not None else []),
        LimitStage(dict(cfg.rate_limits), MemoryGcra(), default_key_limit),
        ProxyStage(upstreams, trusted, cfg.normalize.max_body_bytes, rid_header,
                   extra_drop=(cfg.normalize.client_cert_header,) if cfg.normalize.client_cert_header else ()),
    ]
    completions: list[CompletionStage] = [record, MetricsStage(metrics)]
    app = GatewayApp(Pipeline(stages, completions), rid_header)
    # Forward-auth decisions run these very stage objects (shared keys, limits, policy).
    decision_app = (build_decision_app(cfg.forward_auth, stages, completions, writer=writer,
                                       normalize=cfg.normalize, signatures=cfg.signatures,
                                       request_id_header=rid_header)
                    if cfg.forward_auth is not None else None)
    if cfg.server.tls is not None and cfg.server.tls.hsts_max_age_seconds:
        app.static_headers.append((b"strict-transport-security", cfg.server.tls.hsts()))
    metrics.info.labels(version=__version__).set(1)

    stop_watch = asyncio.Event()
    watch_tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        if introspector is not None:
            introspector.open()  # reads the client secret: fails start-up when it is missing
        for u in upstreams.values():
            u.open()
        keys.start()
        writer.start()
        if auth_server is not None:
            await auth_server.start()
        if jwt is not None:
            # Warm the JWKS caches; an issuer that is down now is retried on first use.
            for source in jwt.issuers.values():
                await source.refresh(forced=False)
        for owner_source in owners.values():
            if isinstance(owner_source, UpstreamOwnerSource):
                owner_source.open()
        if engine is not None:
            # Policies reload atomically on change, without dropping requests.
            watch_tasks.append(asyncio.create_task(engine.watch(stop_watch)))

    async def stop() -> None:
        stop_watch.set()
        for task in watch_tasks:
            await task
        for owner_source in owners.values():
            await owner_source.close()
        if governance is not None:
            governance.close()
        await keys.stop()
        if auth_server is not None:
            await auth_server.stop()
        if introspector is not None:
            await introspector.close()
        for u in upstreams.values():
            await u.close()
        # close() flushes and may wait (up to its timeout): off the event loop.
        await asyncio.to_thread(writer.close)
        key_store.close()

    app.startup_hooks.append(start)
    app.shutdown_hooks.append(stop)
    return Gateway(app, metrics, writer, keys, upstreams, auth_server, decision_app)

