"""CSRF defence for every state-changing form and JSON POST (OWASP CSRF cheat sheet):

1. A synchronizer token bound to the browser's session or login-flow cookie: an HMAC of
   the cookie value under a key derived from the data directory's identity secret. A
   page from another site can neither read the token nor make one for this browser.
2. An Origin check (and, without Origin, a Referer check): a request that names another
   origin is refused even with a valid token. ``Origin: null`` (what browsers send for a
   form on a page with `Referrer-Policy: no-referrer`, as `html_response` sets) names no
   origin: the Referer check and the token decide. Pages with forms should send
   `Referrer-Policy: same-origin` (identity pages do) so browsers send their real Origin.

Other areas (the consent page) build one `Csrf` at install time and use `token(req)` in
their form and `check(req)` on the POST; `csrf_token(ctx, req)` / `check_csrf(ctx, req)`
are the one-shot forms.
"""

from __future__ import annotations

import base64
import hmac
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from portcullis.oauth.http import AsRequest
from portcullis.oauth.identity.cookies import FLOW, SESSION, cookie_name
from portcullis.oauth.identity.keys import IdentityKeys

if TYPE_CHECKING:
    from portcullis.oauth.service import AuthContext

FIELD = "csrf_token"
HEADER = "x-csrf-token"


def _origin(url: str) -> str | None:
    try:
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            return None
        port = p.port
    except ValueError:
        return None
    default = 443 if p.scheme == "https" else 80
    host = p.hostname if ":" not in p.hostname else f"[{p.hostname}]"
    return f"{p.scheme}://{host}" + (f":{port}" if port and port != default else "")


class Csrf:
    """Tokens bound to this browser's identity cookies, and the check of a POST."""

    def __init__(self, key: bytes, issuer: str) -> None:
        self._key = key
        self._issuer = issuer.rstrip("/")
        self._origin = _origin(self._issuer)
        self._cookies = (cookie_name(SESSION, self._issuer), cookie_name(FLOW, self._issuer))

    @classmethod
    def open(cls, ctx: AuthContext) -> Csrf:
        return cls(IdentityKeys.load(ctx.secrets_dir).csrf, ctx.cfg.issuer)

    def token_for(self, cookie_value: str) -> str:
        """The token for a session or flow cookie value (e.g. one being set right now)."""
        mac = hmac.digest(self._key, b"csrf\x00" + cookie_value.encode(), "sha256")
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def token(self, req: AsRequest) -> str:
        """The token for this browser's session cookie (else its login-flow cookie);
        "" when it has neither — such a browser cannot pass `check`."""
        for name in self._cookies:
            value = req.cookies.get(name)
            if value:
                return self.token_for(value)
        return ""

    def failure(self, req: AsRequest) -> str | None:
        """None when the POST passes, else the audit reason (`csrf.cross_origin`,
        `csrf.missing`, `csrf.mismatch`)."""
        origin = (req.headers.get("origin") or "").strip()
        if origin and origin != "null":
            if origin != self._origin:
                return "csrf.cross_origin"
        else:
            # No Origin, or the opaque "null" a browser sends for a form posted from a page
            # whose Referrer-Policy is no-referrer (Fetch §3.1 "append a request Origin
            # header"): the Referer, if any, must be ours, and the token decides.
            referer = req.headers.get("referer")
            if referer is not None and _origin(referer) != self._origin:
                return "csrf.cross_origin"
        presented = req.headers.get(HEADER)
        if presented is None:
            values = req.form.get(FIELD) or []
            presented = values[0] if len(values) == 1 else None
        if not presented:
            return "csrf.missing"
        for name in self._cookies:
            value = req.cookies.get(name)
            if value and hmac.compare_digest(self.token_for(value).encode(), presented.encode("utf-8", "replace")):
                return None
        return "csrf.mismatch"

    def check(self, req: AsRequest) -> bool:
        """True when this POST carries a valid token from this origin."""
        return self.failure(req) is None


def csrf_token(ctx: AuthContext, req: AsRequest) -> str:
    """One-shot `Csrf.open(ctx).token(req)` (reads the key file; prefer one `Csrf`)."""
    return Csrf.open(ctx).token(req)


def check_csrf(ctx: AuthContext, req: AsRequest) -> bool:
    """One-shot `Csrf.open(ctx).check(req)`."""
    return Csrf.open(ctx).check(req)
