"""Opening the authorization server for administration (CLI, demo seeding, later the
admin API): the same stores and installers a running gateway uses, without serving."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from portcullis.audit.events import AuditEvent
from portcullis.config import ConfigError, LoadedConfig, load_config
from portcullis.gateway import open_audit_store, open_key_store
from portcullis.oauth.service import AuthContext, AuthServer, build_auth_server
from portcullis.storage.sqlite_keys import SqliteKeyStore


class AdminError(Exception):
    """The authorization server cannot be opened; the message says why."""


def config_for(config: Path | None, data_dir: Path | None) -> LoadedConfig:
    """The config to administer: the file given, or the one a data directory carries
    (`portcullis demo` writes `config.yaml` into its data directory)."""
    path = config if config is not None else (data_dir / "config.yaml" if data_dir is not None else None)
    if path is None:
        raise AdminError("give --config FILE or --data-dir DIR")
    if not path.is_file():
        raise AdminError(f"{path}: no such config file")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise AdminError("; ".join(exc.errors)) from None


@dataclass
class Admin:
    """An opened authorization server and the gateway store it writes revocations to."""

    auth: AuthServer
    key_store: SqliteKeyStore

    @property
    def ctx(self) -> AuthContext:
        return self.auth.ctx

    def record(self, action: str, *, tenant: str = "", credential_id: str = "",
               extra: dict[str, object] | None = None) -> None:
        """Append an admin event (`kind` "admin", `reason` the action) to the audit log."""
        store = open_audit_store(self.auth.ctx.data_dir)
        try:
            store.append_batch([AuditEvent(
                ts=time.time(), kind="admin", request_id=secrets.token_hex(8), decision="allow", reason=action,
                subject="cli", tenant=tenant, credential_id=credential_id, extra=dict(extra or {}),
            )])
        finally:
            store.close()

    def close(self) -> None:
        self.auth.ctx.db.close()
        self.key_store.close()


def open_auth(loaded: LoadedConfig) -> Admin:
    """The authorization server of a config, for administration (nothing is served)."""
    cfg = loaded.config.auth_server
    if cfg is None:
        raise AdminError("the config has no auth_server section")
    key_store, hasher = open_key_store(loaded.data_dir)
    auth = build_auth_server(cfg, loaded.data_dir, hasher, key_store,
                             client_cert_header=loaded.config.normalize.client_cert_header)
    return Admin(auth, key_store)
