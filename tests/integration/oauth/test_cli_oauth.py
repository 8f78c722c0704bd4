"""`portcullis tenants|clients|users|signing-keys|sessions` as an operator runs them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from portcullis.gateway import open_audit_store
from tests.integration.oauth.conftest import oauth_storage
from tests.integration.test_process import cli


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gw.yaml"
    with oauth_storage() as storage:
        path.write_text("""
data_dir: ./data
server: {listen: {port: 18080}, metrics: null}
auth_server: {issuer: "http://127.0.0.1:18080"}
upstreams: {api: {url: "http://127.0.0.1:9"}}
routes:
  - {name: r, path: "/v1/x", methods: [GET], upstream: api, auth: [jwt], scopes: [s]}
""" + (f"storage: {json.dumps(storage)}\n" if storage is not None else ""))
        yield path


def ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tenants_and_clients(cfg: Path) -> None:
    c = str(cfg)
    assert "created tenant acme" in ok("tenants", "create", "acme", "--config", c)
    assert "updated tenant acme (mfa: phishing-resistant)" in ok(
        "tenants", "create", "acme", "--mfa", "phishing-resistant", "--config", c)
    assert "mfa=phishing_resistant" in ok("tenants", "list", "--config", c)
    # Re-running create without --mfa keeps the policy (no silent downgrade).
    assert "(mfa: phishing-resistant)" in ok("tenants", "create", "acme", "--config", c)
    assert cli("tenants", "create", "bad name", "--config", c).returncode == 2
    assert cli("tenants", "create", "t", "--mfa", "sometimes", "--config", c).returncode == 2

    created = json.loads(ok("clients", "create", "--name", "backend", "--tenant", "acme", "--scope", "s",
                            "--json", "--config", c))
    assert created["client_secret"].startswith("pcs_")
    listed = ok("clients", "list", "--json", "--config", c)
    assert created["client_id"] in listed and created["client_secret"] not in listed  # shown once only
    dup = cli("clients", "create", "--name", "backend", "--tenant", "acme", "--config", c)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    public_cc = cli("clients", "create", "--name", "p", "--tenant", "acme", "--auth-method", "none",
                    "--grant", "client_credentials", "--config", c)
    assert public_cc.returncode == 2 and "public client" in public_cc.stderr
    http_redirect = cli("clients", "create", "--name", "w", "--tenant", "acme", "--auth-method", "none",
                        "--grant", "authorization_code", "--redirect-uri", "http://app.example/cb", "--config", c)
    assert http_redirect.returncode == 2 and "loopback" in http_redirect.stderr
    unknown_tenant = cli("clients", "create", "--name", "x", "--tenant", "nope", "--config", c)
    assert unknown_tenant.returncode == 2 and "no tenant" in unknown_tenant.stderr

    assert "every token issued to it" in ok("clients", "revoke", created["client_id"], "--config", c)
    assert created["client_id"] not in ok("clients", "list", "--config", c)
    assert f"client {created['client_id']}" in ok("tokens", "revoked", "--config", c)
    again = cli("clients", "revoke", created["client_id"], "--config", c)
    assert again.returncode == 1

    store = open_audit_store(cfg.parent / "data", writable=False)
    try:
        reasons = [e.reason for e in store.iter_events()]
    finally:
        store.close()
    assert {"admin.tenant_created", "admin.tenant_updated", "admin.client_created",
            "admin.client_revoked"} <= set(reasons)
    assert "ok" in ok("audit", "verify", "--config", c).lower()


def test_users_sessions_and_signing_keys(cfg: Path, tmp_path: Path) -> None:
    c = str(cfg)
    ok("tenants", "create", "acme", "--config", c)
    weak = tmp_path / "weak"
    weak.write_text("password123\n")
    refused = cli("users", "create", "eve@acme.example", "--tenant", "acme", "--password-file", str(weak),
                  "--config", c)
    assert refused.returncode == 2 and "password refused" in refused.stderr
    out = ok("users", "create", "alice@acme.example", "--tenant", "acme", "--role", "tenant-admin", "--totp",
             "--config", c)
    fields = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert fields["user_id"].startswith("usr_") and len(fields["password"]) >= 12 and len(fields["totp"]) >= 16
    listed = json.loads(ok("users", "list", "--json", "--config", c))
    assert listed == [{"user_id": fields["user_id"], "username": "alice@acme.example", "tenant": "acme",
                       "roles": ["tenant-admin"], "totp": True, "passkeys": 0, "active": True}]
    assert fields["password"] not in json.dumps(listed)
    codes = ok("users", "recovery-codes", "alice@acme.example", "--config", c).split()
    assert len(codes) == 10 and len(set(codes)) == 10
    assert ok("users", "enroll-totp", "alice@acme.example", "--config", c).strip() != fields["totp"]
    assert "ended 0 sessions" in ok("sessions", "revoke", "alice@acme.example", "--config", c)
    assert "revoked 0 app grants" in ok("users", "revoke-grants", "alice@acme.example", "--config", c)
    assert "was not throttled" in ok("users", "unlock", "alice@acme.example", "--config", c)
    assert "disabled alice@acme.example" in ok("users", "disable", "alice@acme.example", "--config", c)
    assert cli("users", "disable", "alice@acme.example", "--config", c).returncode == 1
    assert cli("users", "disable", "nobody@acme.example", "--config", c).returncode == 1

    before = json.loads(ok("signing-keys", "list", "--json", "--config", c))
    assert len(before) == 1 and before[0]["current"]
    ok("signing-keys", "rotate", "--config", c)
    after = json.loads(ok("signing-keys", "list", "--json", "--config", c))
    assert len(after) == 2
    assert [k["kid"] for k in after if k["current"]] != [before[0]["kid"]]
    assert any(k["kid"] == before[0]["kid"] and k["retired_at"] for k in after)  # still published


def test_commands_need_an_auth_server(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("""
data_dir: ./data
upstreams: {api: {url: "http://127.0.0.1:9"}}
routes:
  - {name: r, path: "/v1/x", methods: [GET], upstream: api, public: true}
""")
    r = cli("tenants", "list", "--config", str(path))
    assert r.returncode == 1 and "no auth_server section" in r.stderr
    r = cli("clients", "list", "--data-dir", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no such config file" in r.stderr
