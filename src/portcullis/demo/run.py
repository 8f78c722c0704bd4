"""`portcullis demo`: a complete gateway in front of the demo SaaS API (DEMO.md).

Everything lives under the data directory: the generated config (`config.yaml`, to
read and copy), the key store, the audit log, the secrets and `credentials.json`.
A second start reuses the same keys (a key revoked during the tour stays revoked);
`--reset` starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.config import LoadedConfig, parse_config
from portcullis.demo.seed_oauth import SPA_REDIRECT, seed_auth
from portcullis.demo.spa import DemoSpa
from portcullis.demo.upstream import UpstreamThread
from portcullis.gateway import DataPaths
from portcullis.keysadmin import create_key
from portcullis.oauth.models import ClientExistsError, new_client_id

MARKER = ".portcullis-demo"
TENANTS = ["acme", "globex"]
READER_LIMIT = {"requests": 60, "per_seconds": 60, "burst": 10}
WRITER_LIMIT = {"requests": 120, "per_seconds": 60, "burst": 20}
BENCH_LIMIT = {"requests": 100_000_000, "per_seconds": 60, "burst": 100_000}
DEMO_KEYS: list[dict[str, Any]] = [
    {"name": "acme-reader", "tenant": "acme", "scopes": ["projects:read"], "rate_limit": READER_LIMIT},
    {"name": "acme-writer", "tenant": "acme", "scopes": ["projects:read", "projects:write", "billing:read"],
     "rate_limit": WRITER_LIMIT},
    {"name": "globex-reader", "tenant": "globex", "scopes": ["projects:read"], "rate_limit": READER_LIMIT},
    {"name": "acme-bench", "tenant": "acme", "scopes": ["projects:read"], "rate_limit": BENCH_LIMIT},
]


class DemoError(Exception):
    """The demo cannot start; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PARTNER: dict[str, Any] = {"name": "partner-analytics", "tenant": "acme", "scopes": ["projects:read", "billing:read"],
                           "key_id": "partner-analytics-2026", "rate_limit": READER_LIMIT}


def new_signing_key() -> str:
    """A fresh Ed25519 private key, PKCS#8 PEM (RFC 9421 §3.3.6)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def demo_config(upstream_url: str, port: int, metrics_port: int, *, trust_issuer: str | None = None,
                tenant_claim: str = "tenant", partner_public_pem: str | None = None,
                partner_client_id: str | None = None) -> dict[str, Any]:
    """The demo's gateway config, as the YAML document an operator would write.

    With `trust_issuer`, access tokens from that OpenID Connect issuer (found by
    discovery) are accepted too, with `aud` equal to the gateway URL (DEMO.md). The
    built-in authorization server shares the gateway's origin: its issuer is the
    gateway URL, and its access tokens are accepted on every API route.
    """
    t = "/v1/tenants/{tenant}"
    gateway_url = f"http://127.0.0.1:{port}"
    auth = ["api_key", "jwt"]

    def route(name: str, method: str, path: str, scopes: list[str], **kw: Any) -> dict[str, Any]:
        return {"name": name, "methods": [method], "path": path, "upstream": "demo-api",
                "auth": auth, "scopes": scopes, "tenant_param": "tenant", **kw}

    jwt = {"jwt": {"issuers": [{"issuer": trust_issuer, "discovery": True, "audience": f"http://127.0.0.1:{port}",
                                "tenant_claim": tenant_claim}]}} if trust_issuer else {}
    signatures = {"signatures": {
        "keys": [{"key_id": PARTNER["key_id"], "alg": "ed25519", "public_key_pem": partner_public_pem}],
        # The partner's access tokens must be signed by the same key as its API key (DEMO.md).
        **({"clients": {partner_client_id: PARTNER["key_id"]}} if partner_client_id else {}),
    }} if partner_public_pem else {}
    return {**jwt, **signatures,
        "version": 1,
        "data_dir": ".",
        "server": {"listen": {"host": "127.0.0.1", "port": port},
                   "metrics": {"host": "127.0.0.1", "port": metrics_port}},
        "auth_server": {"issuer": gateway_url},
        "upstreams": {"demo-api": {"url": upstream_url, "connect_timeout": 2, "read_timeout": 10}},
        "rate_limits": {"per-ip-public": {"requests": 600, "per_seconds": 60, "burst": 50, "key": "ip"}},
        "routes": [
            {"name": "health", "methods": ["GET"], "path": "/v1/health", "upstream": "demo-api",
             "public": True, "rate_limit": "per-ip-public"},
            route("list-projects", "GET", f"{t}/projects", ["projects:read"]),
            route("create-project", "POST", f"{t}/projects", ["projects:write"]),
            route("get-project", "GET", t + "/projects/{id}", ["projects:read"]),
            route("delete-project", "DELETE", t + "/projects/{id}", ["projects:write"], roles=["tenant-admin"]),
            route("list-invoices", "GET", f"{t}/invoices", ["billing:read"]),
            route("get-user", "GET", t + "/users/{id}", ["users:read"]),
        ],
    }


def prepare(data_dir: Path, port: int, upstream_url: str, credentials_out: Path | None, *,
            reset: bool, metrics_port: int | None = None, trust_issuer: str | None = None,
            tenant_claim: str = "tenant") -> tuple[LoadedConfig, dict[str, Any], Path]:
    """Create or reuse the demo's data directory; returns config, credentials and their path."""
    data_dir = data_dir.resolve()
    if reset and data_dir.exists():
        if not (data_dir / MARKER).exists():
            raise DemoError(f"{data_dir} is not a demo data directory (no {MARKER}); refusing to delete it")
        shutil.rmtree(data_dir)
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / MARKER).exists():
        raise DemoError(f"{data_dir} exists and is not a demo data directory; choose another --data-dir")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / MARKER).touch()
    creds_path = (credentials_out or data_dir / "credentials.json").resolve()
    internal = data_dir / "demo-credentials.json"  # the demo's own copy, always in the data dir
    gateway_url = f"http://127.0.0.1:{port}"
    if internal.exists():
        creds = json.loads(internal.read_text())
    elif DataPaths(data_dir).keys_db.exists():
        raise DemoError(f"{data_dir} has keys but lost its credentials file; start with --reset")
    else:
        creds = _seed(data_dir)
    partner = next((c for c in creds.get("clients", []) if c.get("name") == PARTNER["name"]), None)
    partner_pub = public_pem(partner["signing"]["private_key_pem"]) if partner else None
    cfg_doc = demo_config(upstream_url, port, metrics_port or free_port(), trust_issuer=trust_issuer,
                          tenant_claim=tenant_claim, partner_public_pem=partner_pub,
                          partner_client_id=partner.get("client_id") if partner else None)
    cfg_path = data_dir / "config.yaml"
    cfg_path.write_text("# Generated by `portcullis demo`; regenerated on every start.\n"
                        + yaml.safe_dump(cfg_doc, sort_keys=False))
    loaded = parse_config(cfg_path.read_text(), cfg_path)
    if "users" not in creds:  # a new data directory: seed the authorization server once
        if partner is None or "client_id" not in partner:
            raise DemoError(f"{data_dir} was made by an older version; start with --reset")
        try:
            seed_auth(loaded, creds, partner)
        except ClientExistsError:
            raise DemoError(f"{data_dir} was seeded only in part; start with --reset") from None
    creds["gateway_url"] = gateway_url
    creds["issuer"] = gateway_url
    creds["audience"] = gateway_url  # the `aud` access tokens must carry (ours and a trusted issuer's)
    creds["metrics_url"] = f"http://127.0.0.1:{loaded.config.server.metrics.port}/metrics" \
        if loaded.config.server.metrics else None
    ordered = {"gateway_url": gateway_url, **{k: v for k, v in creds.items() if k != "gateway_url"}}
    for path in {internal, creds_path}:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(ordered, f, indent=2)
            f.write("\n")
        tmp.replace(path)
    return loaded, ordered, creds_path


def python_command() -> str:
    """The Python running this demo, relative when it lives under the current directory."""
    exe = Path(sys.executable)
    rel = os.path.relpath(exe)
    return ("./" + rel if not rel.startswith(".") else rel) if not rel.startswith("..") else str(exe)


def cli_command() -> str:
    """How to call this CLI again from the current directory (e.g. `.venv/bin/portcullis`)."""
    prog = Path(sys.argv[0])
    if prog.name == "portcullis" and prog.exists():
        rel = os.path.relpath(prog.resolve().parent / prog.name)
        found = shutil.which("portcullis")
        if found and Path(found).resolve() == prog.resolve():
            return "portcullis"
        return rel if rel.startswith(".") or rel.startswith("/") else "./" + rel
    return f"{sys.executable} -m portcullis"


def _seed(data_dir: Path) -> dict[str, Any]:
    """Create the demo's keys (and the partner's signing key); returns the credentials."""
    api_keys = []
    for spec in DEMO_KEYS:
        rl = spec["rate_limit"]
        _, key = create_key(data_dir, name=spec["name"], tenant=spec["tenant"], scopes=spec["scopes"],
                            roles=[], rate_limit=(rl["requests"], float(rl["per_seconds"]), rl["burst"]))
        api_keys.append({"name": spec["name"], "key": key, "tenant": spec["tenant"],
                         "scopes": spec["scopes"], "rate_limit": rl})
    creds = {"tenants": TENANTS, "api_keys": api_keys}
    signing_pem = new_signing_key()
    rl = PARTNER["rate_limit"]
    _, partner_key = create_key(data_dir, name=str(PARTNER["name"]), tenant=str(PARTNER["tenant"]),
                                scopes=list(PARTNER["scopes"]), roles=[],
                                rate_limit=(rl["requests"], float(rl["per_seconds"]), rl["burst"]),
                                signing_key_id=str(PARTNER["key_id"]))
    creds["clients"] = [{"name": PARTNER["name"], "client_id": new_client_id(), "tenant": PARTNER["tenant"],
                         "scopes": PARTNER["scopes"], "api_key": partner_key,
                         "signing": {"key_id": PARTNER["key_id"], "alg": "ed25519", "private_key_pem": signing_pem}}]
    return creds


def start_spa(creds: dict[str, Any]) -> UpstreamThread | None:
    """Serve the demo's `acme-spa` client on its registered loopback port (8765), or on
    any free loopback port when that one is taken (RFC 8252 §7.3 lets the port vary)."""
    spa = next((c for c in creds.get("clients", []) if c.get("name") == "acme-spa"), None)
    if spa is None:
        return None
    registered = urlsplit(SPA_REDIRECT)
    for port in (registered.port or 0, 0):
        app = DemoSpa(creds["issuer"], spa["client_id"], "", "openid profile projects:read offline_access",
                      "/v1/tenants/acme/projects")
        thread = UpstreamThread(app, port=port)
        app.redirect_uri = f"{thread.url}{registered.path}"
        try:
            thread.start()
        except OSError:
            continue
        return thread
    return None


def quickstart(creds: dict[str, Any], creds_path: Path, data_dir: Path, *, spa_url: str | None = None) -> str:
    """The text printed on start: copy-paste curl lines that work as written."""
    g = creds["gateway_url"]
    pcl = cli_command()
    k = {a["name"]: a["key"] for a in creds["api_keys"]}
    return f"""{_summary(g, data_dir, creds_path, creds)}
Try it (each line works as written):
  curl -s {g}/v1/health
  curl -s {g}/v1/tenants/acme/projects                                   # 401: no credential
  curl -s -H 'Authorization: Bearer {k['acme-reader']}' {g}/v1/tenants/acme/projects
  curl -s -H 'X-API-Key: {k['acme-reader']}' {g}/v1/tenants/globex/projects     # 403: other tenant
  curl -s -H 'X-API-Key: {k['acme-reader']}' {g}/v1/tenants/acme/invoices       # 403: missing scope
  curl -s -H 'X-API-Key: {k['acme-writer']}' -H 'Content-Type: application/json' \\
       -d '{{"name":"Apollo"}}' {g}/v1/tenants/acme/projects
  curl -s {g}/v1/tenants/acme/../globex/projects --path-as-is             # 400: dot segments
  # partner-analytics must sign its requests (RFC 9421); `sign` prints a signed curl command:
  eval "$({pcl} sign --credentials {creds_path} --client partner-analytics GET {g}/v1/tenants/acme/invoices)"
{_oauth_tour(creds, spa_url)}
  {pcl} audit tail --data-dir {data_dir}
  {pcl} audit verify --data-dir {data_dir}
  {pcl} keys list --data-dir {data_dir}

Stop with Ctrl-C (the audit log is flushed first).
"""


def _summary(g: str, data_dir: Path, creds_path: Path, creds: dict[str, Any]) -> str:
    return f"""
Portcullis demo is running.
  gateway      {g}
  issuer       {creds.get('issuer', g)}   (OAuth 2.1 / OpenID Connect)
  metrics      {creds.get('metrics_url')}
  credentials  {creds_path}
  data         {data_dir}
"""


def _oauth_tour(creds: dict[str, Any], spa_url: str | None) -> str:
    """The authorization server's part of the quickstart: a client-credentials token used
    at the gateway, and a browser login with MFA through the demo client."""
    g = creds["issuer"]
    clients = {c["name"]: c for c in creds.get("clients", [])}
    users = {u["username"]: u for u in creds.get("users", [])}
    backend, alice = clients.get("acme-backend"), users.get("alice@acme.example")
    if backend is None or alice is None:
        return ""
    py = python_command()
    lines = f"""  # OAuth: acme-backend gets a client-credentials token and calls the API with it
  curl -s {g}/.well-known/openid-configuration
  TOKEN=$(curl -s -u '{backend['client_id']}:{backend['client_secret']}' -d grant_type=client_credentials \\
       -d scope=projects:read {g}/oauth2/token | {py} -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer $TOKEN" {g}/v1/tenants/acme/projects"""
    if spa_url:
        lines += f"""
  # A browser login with MFA: open {spa_url}/ and sign in as {alice['username']} / {alice['password']}
  #   with the TOTP code this prints:  {py} -c "import pyotp; print(pyotp.TOTP('{alice['totp_secret']}').now())\""""
    return lines

