"""The demo's `acme-spa`: a tiny OAuth client a newcomer signs in to with a browser.

It plays the public client of DEMO.md (authorization code + PKCE S256, no secret):
`/` links to the gateway's authorization endpoint; `/callback` checks `state` and the
RFC 9207 `iss`, redeems the code with the PKCE verifier, and shows the tokens and one
API call made with the access token. It exists to make the tour clickable; its
redirect URI is the registered loopback one (RFC 8252 §7.3: any port on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import secrets
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qs, urlencode

Scope = dict[str, Any]

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>acme-spa (demo client)</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#f4f4f4;padding:.75rem;overflow:auto;white-space:pre-wrap;word-break:break-all}}</style>
</head><body><main><h1>acme-spa</h1>{body}</main></body></html>"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(jwt: str) -> Any:
    """The payload of a JWT, for display only (the gateway verifies; this page just shows)."""
    try:
        seg = jwt.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (IndexError, ValueError):
        return None


class DemoSpa:
    """ASGI app. `redirect_uri` must be the one registered for `client_id`."""

    def __init__(self, issuer: str, client_id: str, redirect_uri: str, scope: str, api_path: str) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.api_path = api_path
        self._pending: OrderedDict[str, str] = OrderedDict()  # state -> PKCE verifier (bounded)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        if path == "/":
            status, headers, body = self._home()
        elif path == "/login":
            status, headers, body = self._login()
        elif path == "/callback":
            status, headers, body = await self._callback(query)
        else:
            status, headers, body = 404, [], PAGE.format(body="<p>Not found.</p>")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store"),
                                *headers]})
        await send({"type": "http.response.body", "body": body.encode()})

    def _home(self) -> tuple[int, list[tuple[bytes, bytes]], str]:
        return 200, [], PAGE.format(body=(
            "<p>A demo OAuth client (public, PKCE). Sign in as a user from the demo's credentials file; "
            "you will be asked for a TOTP code (the file has each user's TOTP secret).</p>"
            '<p><a href="/login">Sign in with Portcullis</a></p>'))

    def _login(self) -> tuple[int, list[tuple[bytes, bytes]], str]:
        state, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        self._pending[state] = verifier
        while len(self._pending) > 100:
            self._pending.popitem(last=False)
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        url = f"{self.issuer}/oauth2/authorize?" + urlencode({
            "response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect_uri,
            "scope": self.scope, "state": state, "nonce": secrets.token_urlsafe(16),
            "code_challenge": challenge, "code_challenge_method": "S256"})
        return 303, [(b"location", url.encode())], ""

    async def _callback(self, q: dict[str, str]) -> tuple[int, list[tuple[bytes, bytes]], str]:
        if "error" in q:
            return 400, [], PAGE.format(body=f"<p>The authorization server said: "
                                             f"<code>{html.escape(q['error'])}</code></p><p><a href='/'>Back</a></p>")
        verifier = self._pending.pop(q.get("state", ""), None)
        if verifier is None:
            return 400, [], PAGE.format(body="<p>Unknown or reused <code>state</code>.</p><p><a href='/'>Back</a></p>")
        if q.get("iss") != self.issuer:  # RFC 9207 §2.4: mix-up defence
            return 400, [], PAGE.format(body="<p>The response did not come from the expected issuer.</p>")
        tokens = await asyncio.to_thread(self._post, f"{self.issuer}/oauth2/token", {
            "grant_type": "authorization_code", "code": q.get("code", ""), "redirect_uri": self.redirect_uri,
            "client_id": self.client_id, "code_verifier": verifier})
        access = str(tokens.get("access_token", ""))
        api = await asyncio.to_thread(self._get, self.issuer + self.api_path, access) if access else "(no token)"
        parts = ["<h2>Signed in</h2>",
                 "<h3>ID token claims</h3><pre>" + html.escape(json.dumps(_claims(str(tokens.get("id_token", ""))),
                                                                          indent=2)) + "</pre>",
                 "<h3>Access token claims</h3><pre>" + html.escape(json.dumps(_claims(access), indent=2)) + "</pre>",
                 f"<h3>GET {html.escape(self.api_path)} with it</h3><pre>{html.escape(api)}</pre>",
                 "<h3>Token response</h3><pre>" + html.escape(json.dumps(tokens, indent=2)) + "</pre>",
                 "<p><a href='/'>Start again</a></p>"]
        return 200, [], PAGE.format(body="".join(parts))

    @staticmethod
    def _post(url: str, form: dict[str, str]) -> dict[str, Any]:
        req = urllib.request.Request(url, urlencode(form).encode(), method="POST",  # noqa: S310 - our own URL
                                     headers={"content-type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read() or b"{}"))

    @staticmethod
    def _get(url: str, token: str) -> str:
        req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return f"{resp.status}\n{resp.read().decode()}"
        except urllib.error.HTTPError as exc:
            return f"{exc.code}\n{exc.read().decode()}"
