"""RFC 9126: Pushed Authorization Requests, and the server-side state of a browser
interaction (login, consent) that the authorization endpoint resumes.

PAR (§2): the client POSTs the whole authorization request to /oauth2/par,
authenticated like at the token endpoint (§2: "the client MUST authenticate");
the server validates it exactly as the authorization endpoint would (§2.1) and answers
a `request_uri` (`urn:ietf:params:oauth:request_uri:<random>`, §2.2) with `expires_in`.
The authorization endpoint then takes only `client_id` and `request_uri` (§4): the
pushed parameters are the request; the `request_uri` is single use (§4: "SHOULD
treat request_uri values as one-time use"), and the client must be the one that
pushed it. A server or client configured to require PAR refuses other requests (§5).

Interactions: when the endpoint must send the browser to log in or to the consent
page, it stores the validated request under an unguessable `urn:portcullis:interaction:`
URI and resumes from it, so nothing the browser carries back can change the request
(a user cannot drop `prompt=login` or `max_age` from the URL on the way back).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import OAuth2Error

from portcullis.oauth import db
from portcullis.oauth.http import FORM, AsRequest, AsResponse, json_response, oauth_error
from portcullis.oauth.models import AUTH_METHODS, Client

if TYPE_CHECKING:
    from portcullis.credentials.apikeys import KeyHasher
    from portcullis.oauth.service import AuthContext

PAR_PREFIX = "urn:ietf:params:oauth:request_uri:"
INTERACTION_PREFIX = "urn:portcullis:interaction:"
#: How long a user has to log in (with MFA) and consent before starting over.
INTERACTION_SECONDS = 900
#: How often one interaction may send the browser to the login page before it fails
#: (a user who cannot reach the required `acr` is not sent round in circles).
MAX_LOGIN_ROUNDS = 3
#: Client authentication parameters: not part of the pushed authorization request.
_CLIENT_AUTH_PARAMS = frozenset({"client_secret", "client_assertion", "client_assertion_type"})

pending = sa.Table(
    "oauth_pending_requests", db.metadata,
    sa.Column("uri_hash", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),      # "par" | "interaction"
    sa.Column("client_id", sa.String(64), nullable=False),
    sa.Column("params", sa.Text, nullable=False),          # JSON {name: [values]}
    sa.Column("from_par", sa.Boolean, nullable=False, default=False),
    sa.Column("min_auth_time", sa.Float, nullable=True),   # prompt=login / max_age, fixed at the start
    sa.Column("login_rounds", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("used_at", sa.Float, nullable=True),
)

Params = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class Interaction:
    uri: str
    client_id: str
    params: Params
    from_par: bool
    min_auth_time: float | None
    login_rounds: int


class PendingRequests:
    """Pushed requests and interactions, stored under keyed hashes of their URIs."""

    def __init__(self, adb: db.AuthDb, hasher: KeyHasher, clock: Callable[[], float]) -> None:
        self._db = adb
        self._hasher = hasher
        self._clock = clock

    def _hash(self, uri: str) -> str:
        return self._hasher.digest("pending:" + uri)

    def _insert(self, kind: str, prefix: str, client_id: str, params: Params, lifetime: int, *,
                from_par: bool = False, min_auth_time: float | None = None) -> str:
        now = self._clock()
        uri = prefix + secrets.token_urlsafe(32)
        with self._db.begin() as conn:
            conn.execute(pending.delete().where(pending.c.expires_at < now - 3600))  # housekeeping
            conn.execute(pending.insert().values(
                uri_hash=self._hash(uri), kind=kind, client_id=client_id, params=db.dumps(params),
                from_par=from_par, min_auth_time=min_auth_time, login_rounds=0, created_at=now,
                expires_at=now + lifetime))
        return uri

    def push(self, client_id: str, params: Params, lifetime: int) -> str:
        """Store a validated pushed request; returns its request_uri (RFC 9126 §2.2)."""
        return self._insert("par", PAR_PREFIX, client_id, params, lifetime, from_par=True)

    def take_par(self, uri: str, client_id: str) -> Params | None:
        """The pushed request, once: None if unknown, expired, used or another client's."""
        if len(uri) > 200:
            return None
        now = self._clock()
        h = self._hash(uri)
        with self._db.begin() as conn:
            n = conn.execute(pending.update().where(
                (pending.c.uri_hash == h) & (pending.c.kind == "par") & (pending.c.client_id == client_id)
                & pending.c.used_at.is_(None) & (pending.c.expires_at > now)).values(used_at=now)).rowcount
            if n != 1:
                return None
            row = conn.execute(sa.select(pending.c.params).where(pending.c.uri_hash == h)).one()
        return _params(row.params)

    def open_interaction(self, client_id: str, params: Params, *, from_par: bool,
                         min_auth_time: float | None) -> str:
        return self._insert("interaction", INTERACTION_PREFIX, client_id, params, INTERACTION_SECONDS,
                            from_par=from_par, min_auth_time=min_auth_time)

    def interaction(self, uri: str, client_id: str) -> Interaction | None:
        if len(uri) > 200:
            return None
        with self._db.engine.connect() as conn:
            r = conn.execute(sa.select(pending).where(
                (pending.c.uri_hash == self._hash(uri)) & (pending.c.kind == "interaction")
                & (pending.c.client_id == client_id) & pending.c.used_at.is_(None)
                & (pending.c.expires_at > self._clock()))).first()
        if r is None:
            return None
        return Interaction(uri, r.client_id, _params(r.params), bool(r.from_par), r.min_auth_time,
                           int(r.login_rounds))

    def login_round(self, uri: str) -> None:
        with self._db.begin() as conn:
            conn.execute(pending.update().where(pending.c.uri_hash == self._hash(uri)).values(
                login_rounds=pending.c.login_rounds + 1))

    def finish(self, uri: str) -> bool:
        """End an interaction (a code or an error was sent); False if it already ended."""
        now = self._clock()
        with self._db.begin() as conn:
            n = conn.execute(pending.update().where(
                (pending.c.uri_hash == self._hash(uri)) & pending.c.used_at.is_(None)).values(used_at=now)).rowcount
        return n == 1


def _params(text: str) -> Params:
    raw = json.loads(text)
    return {str(k): [str(v) for v in vs] for k, vs in raw.items()}


#: Validates an authorization request for `client` (the authorization endpoint's rules);
#: raises OAuth2Error.
Validator = Callable[[AsRequest, Client, Params], None]


class ParEndpoint:
    """POST /oauth2/par (RFC 9126 §2)."""

    def __init__(self, ctx: AuthContext, store: PendingRequests, validate: Validator) -> None:
        self._ctx = ctx
        self._store = store
        self._validate = validate

    async def __call__(self, req: AsRequest) -> AsResponse:
        return await asyncio.to_thread(self._handle, req)

    def _handle(self, req: AsRequest) -> AsResponse:
        if req.content_type != FORM:
            return oauth_error("invalid_request", "The body must be application/x-www-form-urlencoded.")
        server = self._ctx.server
        oreq = server.create_oauth2_request(req)
        try:
            client: Client = server.authenticate_client(oreq, list(AUTH_METHODS), endpoint="par")
        except OAuth2Error as err:
            status, body, headers = err()
            resp: AsResponse = server.handle_response(status, body, headers)
            resp.reason = "oauth.par_client_auth"
            return resp
        req.audit["client_id"] = client.client_id
        form = req.form
        params = {k: list(v) for k, v in form.items() if k not in _CLIENT_AUTH_PARAMS}
        if "request_uri" in params:
            # §2.1: "The request_uri authorization request parameter is one exception [...]
            # MUST NOT be provided".
            return oauth_error("invalid_request", "request_uri is not allowed in a pushed request.")
        if params.get("client_id", [client.client_id]) != [client.client_id]:
            return oauth_error("invalid_request", "client_id does not match the authenticated client.")
        params["client_id"] = [client.client_id]
        try:
            self._validate(req, client, params)
        except OAuth2Error as err:
            # §2.3: errors as at the token endpoint (JSON), never a redirect.
            return oauth_error(err.error, err.description or "The authorization request is invalid.",
                               reason=f"oauth.par_{err.error}")
        lifetime = self._ctx.cfg.par_lifetime_seconds
        uri = self._store.push(client.client_id, params, lifetime)
        return json_response({"request_uri": uri, "expires_in": lifetime}, 201, reason="oauth.par_pushed")


def metadata(ctx: AuthContext) -> dict[str, object]:
    """RFC 9126 §5 metadata."""
    return {
        "pushed_authorization_request_endpoint": f"{ctx.cfg.issuer}/oauth2/par",
        "require_pushed_authorization_requests": ctx.cfg.require_par,
    }
