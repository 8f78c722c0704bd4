"""Seeds the demo's authorization server: tenants, the clients and users of DEMO.md.

Runs once, on a new demo data directory, after the config is written (the server is
opened the way the CLI opens it). Secrets land only in the demo's credentials file.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from portcullis.config import LoadedConfig
from portcullis.oauth.admin import open_auth

SPA_REDIRECT = "http://127.0.0.1:8765/callback"
CLIENTS: list[dict[str, Any]] = [
    {"name": "acme-backend", "tenant": "acme", "token_endpoint_auth_method": "client_secret_basic",
     "grant_types": ["client_credentials"], "scopes": ["projects:read", "projects:write"]},
    {"name": "acme-spa", "tenant": "acme", "token_endpoint_auth_method": "none",
     "grant_types": ["authorization_code", "refresh_token"], "redirect_uris": [SPA_REDIRECT],
     "scopes": ["openid", "profile", "projects:read", "projects:write", "offline_access"]},
]
USERS: list[dict[str, Any]] = [
    {"username": "alice@acme.example", "tenant": "acme", "roles": ["tenant-admin"]},
    {"username": "bob@acme.example", "tenant": "acme", "roles": ["member"]},
    {"username": "carol@globex.example", "tenant": "globex", "roles": ["tenant-admin"]},
]


def demo_password() -> str:
    """A random, memorable-enough password that passes the breached-password check."""
    return "-".join(secrets.token_urlsafe(6) for _ in range(3))


def new_client_key() -> tuple[str, str, str]:
    """An ES256 key for private_key_jwt: (private PEM, kid, public JWKS JSON)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    jwk = ECKey.import_key(pem)
    kid = jwk.thumbprint()
    public = {**jwk.as_dict(private=False), "kid": kid, "alg": "ES256", "use": "sig"}
    return pem, kid, json.dumps({"keys": [public]})


def seed_auth(loaded: LoadedConfig, creds: dict[str, Any], partner: dict[str, Any]) -> None:
    """Create tenants, clients and users; record their secrets in `creds` (mutated).
    `partner` is the partner-analytics entry of `creds["clients"]` (API key, signing key)."""
    from portcullis.oauth.identity.users import Users

    handle = open_auth(loaded)
    try:
        ctx = handle.ctx
        for tenant in creds["tenants"]:
            ctx.clients.create_tenant(tenant)
        out: list[dict[str, Any]] = []
        for spec in CLIENTS:
            client, secret = ctx.clients.create_client(
                name=spec["name"], tenant=spec["tenant"], auth_method=spec["token_endpoint_auth_method"],
                grant_types=spec["grant_types"], scopes=spec["scopes"], redirect_uris=spec.get("redirect_uris"),
                first_party=True)
            out.append({"name": spec["name"], "client_id": client.client_id,
                        **({"client_secret": secret} if secret else {}),
                        **{k: v for k, v in spec.items() if k != "name"}})
        pem, kid, jwks = new_client_key()
        client, _ = ctx.clients.create_client(
            name=partner["name"], tenant=partner["tenant"], auth_method="private_key_jwt",
            grant_types=["client_credentials"], scopes=partner["scopes"], jwks=jwks, client_id=partner["client_id"])
        out.append({"name": partner["name"], "client_id": client.client_id, "tenant": partner["tenant"],
                    "token_endpoint_auth_method": "private_key_jwt", "grant_types": ["client_credentials"],
                    "scopes": partner["scopes"], "private_key_pem": pem, "key_id": kid,
                    "api_key": partner["api_key"], "signing": partner["signing"]})
        creds["clients"] = out
        users = Users(ctx)
        seeded = []
        for spec in USERS:
            password = demo_password()
            user = users.create(spec["tenant"], spec["username"], password, spec["roles"])
            totp = users.enroll_totp(user.user_id)
            seeded.append({"username": spec["username"], "password": password, "totp_secret": totp,
                           "tenant": spec["tenant"], "roles": spec["roles"]})
        creds["users"] = seeded
    finally:
        handle.close()
