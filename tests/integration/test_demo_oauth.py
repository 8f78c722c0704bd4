"""The demo's authorization server as DEMO.md promises it: discovery on the gateway's
origin, the seeded clients and users, a client-credentials token used at the gateway,
the partner's private_key_jwt token that must still sign its requests, and a browser
login with MFA through the demo client (`acme-spa`)."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
import urllib.parse
from pathlib import Path

import pyotp
import requests
from joserfc import jwt
from joserfc.jwk import ECKey

from portcullis.signing_client import signed_headers
from tests.integration.harness import free_port
from tests.integration.test_demo import start_demo, stop, wait_ready


def _form_fields(html: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', html)}


def test_demo_authorization_server_tour(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "demo"
    proc = start_demo("--port", str(port), "--data-dir", str(data))
    try:
        wait_ready(proc, port)
        creds = json.loads((data / "credentials.json").read_text())
        g = creds["gateway_url"]
        assert creds["issuer"] == g and creds["audience"] == g
        meta = requests.get(f"{g}/.well-known/openid-configuration", timeout=5).json()
        assert meta["issuer"] == g and meta["token_endpoint"] == f"{g}/oauth2/token"
        assert {u["username"] for u in creds["users"]} == {"alice@acme.example", "bob@acme.example",
                                                          "carol@globex.example"}
        clients = {c["name"]: c for c in creds["clients"]}

        # acme-backend: client credentials, then the API with the token.
        backend = clients["acme-backend"]
        tok = requests.post(f"{g}/oauth2/token", auth=(backend["client_id"], backend["client_secret"]),
                            data={"grant_type": "client_credentials", "scope": "projects:read"}, timeout=5)
        assert tok.status_code == 200, tok.text
        assert tok.headers["cache-control"] == "no-store"
        access = tok.json()["access_token"]
        api = requests.get(f"{g}/v1/tenants/acme/projects", headers={"Authorization": f"Bearer {access}"},
                           timeout=5)
        assert api.status_code == 200
        other = requests.get(f"{g}/v1/tenants/globex/projects", headers={"Authorization": f"Bearer {access}"},
                             timeout=5)
        assert other.status_code == 403

        # partner-analytics: private_key_jwt for its token; its requests must still be signed.
        partner = clients["partner-analytics"]
        key = ECKey.import_key(partner["private_key_pem"])
        now = int(time.time())
        assertion = jwt.encode({"alg": "ES256", "kid": partner["key_id"]},
                               {"iss": partner["client_id"], "sub": partner["client_id"], "aud": g,
                                "iat": now, "exp": now + 60, "jti": f"demo-{now}-{port}"}, key)
        ptok = requests.post(f"{g}/oauth2/token", data={
            "grant_type": "client_credentials", "scope": "billing:read", "client_id": partner["client_id"],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}, timeout=5)
        assert ptok.status_code == 200, ptok.text
        bearer = {"Authorization": f"Bearer {ptok.json()['access_token']}"}
        url = f"{g}/v1/tenants/acme/invoices"
        assert requests.get(url, headers=bearer, timeout=5).status_code == 401  # unsigned
        signed = signed_headers("GET", url, private_key_pem=partner["signing"]["private_key_pem"],
                                key_id=partner["signing"]["key_id"], body=None, extra_headers=bearer)
        assert requests.get(url, headers=signed, timeout=5).status_code == 200

        # A browser login with MFA through the demo client (acme-spa), as the quickstart says.
        printed_spa = re.search(r"open (http://127\.0\.0\.1:\d+)/ and sign in", quickstart_text(proc))
        assert printed_spa, "the quickstart names the demo client's URL"
        spa = printed_spa.group(1)
        alice = next(u for u in creds["users"] if u["username"] == "alice@acme.example")
        browser = requests.Session()
        page = browser.get(f"{spa}/login", timeout=5)  # -> authorize -> login page
        assert page.status_code == 200 and 'autocomplete="username"' in page.text
        login_url = page.url
        fields = _form_fields(page.text)
        fields.update({"username": alice["username"], "password": alice["password"]})
        mfa = browser.post(login_url, data=fields, headers={"Origin": g}, timeout=5)
        assert mfa.status_code == 200 and 'autocomplete="one-time-code"' in mfa.text, mfa.text[:500]
        fields = _form_fields(mfa.text)
        fields["code"] = pyotp.TOTP(alice["totp_secret"]).now()
        done = browser.post(mfa.url, data=fields, headers={"Origin": g}, timeout=10)
        assert done.status_code == 200, done.text[:500]
        assert urllib.parse.urlsplit(done.url).path == "/callback"
        assert "Signed in" in done.text and "urn:portcullis:acr:mfa" in done.text
        assert "200\n" in done.text  # the API call made with the access token
    finally:
        assert stop(proc)[0] == 0


def quickstart_text(proc: subprocess.Popen[str]) -> str:
    """The quickstart the demo printed before serving (read without blocking past it)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + 10
    os.set_blocking(fd, False)
    try:
        while b"Stop with Ctrl-C" not in buf and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.set_blocking(fd, True)
    return buf.decode()
