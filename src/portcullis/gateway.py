"""Builds a running gateway from a validated config: stores, stages, pipeline, app."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from portcullis import __version__
from portcullis.app import GatewayApp
from portcullis.audit.keys import load_or_create_audit_key
from portcullis.audit.spool import AuditSpool
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
from portcullis.observe import Metrics, MetricsStage, PolicyCounters
from portcullis.pipeline import CompletionStage, Pipeline, Stage
from portcullis.policy.engine import PolicyEngine
from portcullis.policy.owners import AnyOwnerSource, UpstreamOwnerSource, build_owner_source
from portcullis.secretfile import create_once
from portcullis.stages.authenticate import AuthenticateStage, KeyCache
from portcullis.stages.authorize import AuthorizeStage
from portcullis.stages.concurrency import ConcurrencyStage
from portcullis.stages.limit import AdmissionStage, LimitStage
from portcullis.stages.normalize import NormalizeStage
from portcullis.stages.policy import PolicyStage
from portcullis.stages.proxy import ProxyStage, Upstream
from portcullis.stages.record import RecordStage
from portcullis.stages.route import Router, RouteStage
from portcullis.stages.signature import SignatureStage
from portcullis.storage.engine import StorageConfig, bind_data_dir, external_engine
from portcullis.storage.sqlite_keys import SqliteKeyStore
from portcullis.traffic.abuse import AbuseGuard
from portcullis.traffic.abuse_shared import SharedAbuse
from portcullis.traffic.adaptive import TrustPolicy
from portcullis.traffic.concurrency import ConcurrencyLimiter
from portcullis.traffic.failover import SharedTraffic
from portcullis.traffic.ledger import QuotaLedger
from portcullis.traffic.memory import MemoryRateBackend
from portcullis.traffic.protocols import QuotaBackend, RateBackend
from portcullis.traffic.quota import SqliteQuotaBackend


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
    only when `create` (commands that merely read or revoke never make a new store).
    The store is in the database the data directory is bound to (`storage:`), else in
    its SQLite file."""
    paths = DataPaths(data_dir)
    bound = external_engine(data_dir)
    if bound is not None:
        _ensure_dir(data_dir)
        store = SqliteKeyStore(bound[0], bound[1])
        try:
            # A shared store with keys but no pepper here: every key would fail (copy the
            # secrets directory to each node); only an empty store may get a new pepper.
            pepper = load_or_create_pepper(paths.pepper, may_create=create and not store.list())
        except BaseException:
            store.close()
            raise
        return store, KeyHasher(pepper)
    if not create and not paths.keys_db.exists():
        raise SecretsError(f"{data_dir}: no key store here (is this the gateway's data directory?)")
    _ensure_dir(data_dir)
    pepper = load_or_create_pepper(paths.pepper, may_create=not paths.keys_db.exists())
    return SqliteKeyStore(paths.keys_db), KeyHasher(pepper)


def _audit_target(data_dir: Path) -> tuple[Path | sa.Engine, StorageConfig | None, bool]:
    """(where the audit log is, its storage settings, whether it already holds events)."""
    paths = DataPaths(data_dir)
    bound = external_engine(data_dir)
    if bound is None:
        return paths.audit_db, None, paths.audit_db.exists()
    engine, storage = bound
    if not sa.inspect(engine).has_table("events"):
        return engine, storage, False
    with engine.connect() as conn:
        return engine, storage, conn.execute(sa.text("SELECT 1 FROM events LIMIT 1")).first() is not None


def open_audit_store(data_dir: Path, *, writable: bool = True) -> SqliteAuditStore:
    """The audit log. Writable: with its signing key (created only for a new log).
    Read-only (tail, verify): never creates anything; the verify key is the signing
    key's public half when the key file is there, else None. The log is in the database
    the data directory is bound to (`storage:`), else in its SQLite file."""
    paths = DataPaths(data_dir)
    target, storage, populated = _audit_target(data_dir)
    if not writable:
        key = load_or_create_audit_key(paths.audit_key) if paths.audit_key.exists() else None
        return SqliteAuditStore(target, verify_key=key.public_key() if key else None, storage=storage)
    _ensure_dir(data_dir)
    if populated and not paths.audit_key.exists():
        if isinstance(target, sa.Engine):
            target.dispose()
        raise SecretsError(f"{paths.audit_key} is missing but the audit log exists: new checkpoints would not "
                           "verify. Restore the key from a backup.")
    key = load_or_create_audit_key(paths.audit_key)
    return SqliteAuditStore(target, signing_key=key, verify_key=key.public_key(), storage=storage)


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
    traffic: Traffic | None = None


@dataclass
class Traffic:
    """The traffic-control stages of a gateway and what they hold (issue 6)."""

    admission: AdmissionStage
    limit: LimitStage
    concurrency: ConcurrencyStage | None
    quota_store: SqliteQuotaBackend | None
    guard: AbuseGuard | None = None

    async def start(self) -> None:
        if self.quota_store is not None:
            self.quota_store.start()

    async def close(self) -> None:
        await self.limit.close()  # closes the rate and quota backends


def build_traffic(loaded: LoadedConfig, *, rates: RateBackend | None = None,
                  quotas: QuotaBackend | None = None) -> Traffic:
    """The admission, concurrency and limit stages. `rates` / `quotas` default to the
    in-process GCRA and the SQLite quota store in the data directory (`traffic.db`);
    shared (Redis) backends are passed in instead."""
    cfg = loaded.config
    t = cfg.traffic
    rates = rates if rates is not None else MemoryRateBackend()
    store: SqliteQuotaBackend | None = None
    need_store = (t.quotas.enabled and quotas is None) or (t.adaptive is not None and t.adaptive.warmup_seconds > 0)
    if need_store:
        store = SqliteQuotaBackend(loaded.data_dir / "traffic.db", flush_seconds=t.quotas.flush_seconds)
    trust = TrustPolicy(t.adaptive, first_seen=store) if t.adaptive is not None else None
    default_key_limit = cfg.keys.default_rate_limit.spec() if cfg.keys.default_rate_limit else None
    limit = LimitStage(dict(cfg.rate_limits), rates, default_key_limit, traffic=t,
                       quotas=quotas if quotas is not None else store, trust=trust)
    guard = AbuseGuard(t.abuse) if t.abuse is not None and t.abuse.enabled else None
    admission = AdmissionStage(dict(cfg.rate_limits), t.admission, rates, guard,
                               t.abuse.status if t.abuse is not None else 429)
    concurrency = ConcurrencyStage(ConcurrencyLimiter(t.concurrency)) if t.concurrency.enabled else None
    return Traffic(admission, limit, concurrency, store, guard)


def load_policy(loaded: LoadedConfig) -> PolicyEngine | None:
    """The Cedar engine of a config's `policy:` section (None without one); raises
    `PolicyError` naming each problem (file, line) when a policy or the schema is invalid."""
    pcfg = loaded.config.policy
    if pcfg is None:
        return None
    base = loaded.path.parent if loaded.path else Path.cwd()
    return PolicyEngine(pcfg, list(loaded.config.routes), pcfg.resolve_dir(base))


def build_gateway(loaded: LoadedConfig, *, rates: RateBackend | None = None,
                  quotas: QuotaBackend | None = None) -> Gateway:
    """Open the stores and assemble the pipeline in DESIGN.md's order. `rates` and
    `quotas` replace the single-node traffic backends (see `build_traffic`)."""
    cfg = loaded.config
    data_dir = loaded.data_dir
    engine = load_policy(loaded)  # before any store is opened: a bad policy opens nothing
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Every store below (and every CLI command on this data directory) uses `storage:`.
    bind_data_dir(data_dir, cfg.storage)
    key_store, hasher = open_key_store(data_dir)
    audit_store = open_audit_store(data_dir)
    metrics = Metrics()
    # While the audit database is unreachable, acknowledged events wait on local disk.
    writer = AuditWriter(audit_store, max_batch=cfg.audit.max_batch, max_backlog=cfg.audit.max_backlog,
                         linger=cfg.audit.linger_ms / 1000, spool=AuditSpool.claim(data_dir / "audit-spool"))
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
    # Several nodes (or `serve --workers`) share counters and replay caches through Redis,
    # each concern failing as `redis.on_failure` says (replay checks always fail closed).
    shared: SharedTraffic | None = None
    if cfg.redis is not None and rates is None and quotas is None:
        # With a shared database too, quota counts outlive Redis (the ledger, issue 6).
        ledger = QuotaLedger.open(data_dir) if cfg.traffic.quotas.enabled else None
        shared = SharedTraffic.open(cfg.redis, ledger=ledger, ledger_flush_seconds=cfg.traffic.quotas.flush_seconds)
        rates, quotas = shared.rates, shared.quotas
    replay = shared.replay if shared is not None else None
    auth_server: AuthServer | None = None
    if cfg.auth_server is not None:
        auth_server = build_auth_server(cfg.auth_server, data_dir, hasher, key_store, trusted=trusted,
                                        client_cert_header=cfg.normalize.client_cert_header, replay=replay)
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
    traffic = build_traffic(loaded, rates=rates, quotas=quotas)
    # Abuse blocks shared by every node: refusals counted in Redis, blocks published.
    abuse_share = (SharedAbuse(traffic.guard, shared.backends.connection,
                               probe_interval=shared.backends.connection.cfg.on_failure.probe_interval_ms / 1000)
                   if shared is not None and traffic.guard is not None else None)
    stages: list[Stage] = [
        record,  # admission: refuse when the audit log cannot keep up (fail closed)
        NormalizeStage(cfg.normalize, trusted),
        # Abuse denials and gateway-wide limits: before any authentication cost.
        traffic.admission,
        # The authorization server answers its own paths on this origin (issue 4).
        *([auth_server.stage] if auth_server is not None else []),
        RouteStage(Router(list(cfg.routes))),
        AuthenticateStage(keys, hasher, jwt=jwt, introspector=introspector, trusted=trusted,
                          client_cert_header=cfg.normalize.client_cert_header, dpop=dpop, dpop_nonces=dpop_nonces,
                          signatures_enabled=cfg.signatures is not None, replay=replay),
        *([SignatureStage(cfg.signatures, cfg.normalize.max_body_bytes,
                          loaded.path.parent if loaded.path else None, trusted, replay)] if cfg.signatures else []),
        AuthorizeStage(),
        *([policy] if policy is not None else []),
        # Concurrency before limits: a request shed there uses up no rate or quota.
        *([traffic.concurrency] if traffic.concurrency is not None else []),
        traffic.limit,
        ProxyStage(upstreams, trusted, cfg.normalize.max_body_bytes, rid_header,
                   extra_drop=(cfg.normalize.client_cert_header,) if cfg.normalize.client_cert_header else ()),
    ]
    completions: list[CompletionStage] = [record, *([traffic.concurrency] if traffic.concurrency else []),
                                          traffic.admission, MetricsStage(metrics)]
    app = GatewayApp(Pipeline(stages, completions), rid_header)
    # Forward-auth decisions run these very stage objects (shared keys, limits, policy).
    decision_app = (build_decision_app(cfg.forward_auth, stages, completions, writer=writer,
                                       normalize=cfg.normalize, signatures=cfg.signatures,
                                       request_id_header=rid_header)
                    if cfg.forward_auth is not None else None)
    if cfg.server.tls is not None and cfg.server.tls.hsts_max_age_seconds:
        app.static_headers.append((b"strict-transport-security", cfg.server.tls.hsts()))
    metrics.info.labels(version=__version__).set(1)
    if engine is not None:
        metrics.registry.register(PolicyCounters(engine))

    stop_watch = asyncio.Event()
    watch_tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        if introspector is not None:
            introspector.open()  # reads the client secret: fails start-up when it is missing
        for u in upstreams.values():
            u.open()
        keys.start()
        writer.start()
        await traffic.start()
        if shared is not None:
            shared.start()
        if abuse_share is not None:
            abuse_share.start()
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
        await traffic.close()
        if abuse_share is not None:
            await abuse_share.close()
        if shared is not None:
            await shared.close()
        key_store.close()

    app.startup_hooks.append(start)
    app.shutdown_hooks.append(stop)
    return Gateway(app, metrics, writer, keys, upstreams, auth_server, decision_app, traffic)

