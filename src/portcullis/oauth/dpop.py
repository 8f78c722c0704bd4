"""DPoP at the token endpoint (RFC 9449 §4.3, §5, §8) and certificate binding (RFC 8705 §3).

The proof is checked by the gateway's verifier (`portcullis.credentials.rfc9449`: typ
``dpop+jwt``, allowlisted asymmetric `alg`, an embedded public `jwk` only, the signature,
`htm` POST, `htu` the token endpoint URL, the `iat` window, one use per `jti`), with
no access token (§4.3 point 12 does not apply at the token endpoint). Its own replay
cache and, when `dpop_nonce_required`, its own nonces: "the authorization server and
resource server ... might use different nonces" (§8), so the key file differs from
the gateway's.

Errors are RFC 6749 §5.2 responses (§5, §12.2): ``invalid_dpop_proof``, or
``use_dpop_nonce`` with a fresh ``DPoP-Nonce`` header (§8).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from portcullis.credentials.rfc9449 import DpopConfig, DpopNonces, DpopRefusal, DpopVerifier
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.http import AsResponse, oauth_error
from portcullis.oauth.server import OAuthRequest
from portcullis.secretfile import create_once
from portcullis.tls import cert_thumbprint
from portcullis.traffic.protocols import BackendUnavailable, ReplayCache

NONCE_KEY_FILE = "as-dpop-nonce-key"
#: The algorithms we accept in proofs (published as dpop_signing_alg_values_supported).
DPOP_ALGS = ["ES256", "EdDSA", "PS256", "RS256"]


def _nonce_secret(secrets_dir: Path) -> bytes:
    path = secrets_dir / NONCE_KEY_FILE
    if not path.exists() or len(path.read_bytes()) < 32:
        path.unlink(missing_ok=True)
        create_once(path, secrets.token_bytes(32))
    return path.read_bytes()


class TokenEndpointDpop:
    """Checks the ``DPoP`` header of token requests and binds the request to its key."""

    def __init__(self, cfg: AuthServerConfig, secrets_dir: Path, clock: Callable[[], float],
                 replay: ReplayCache | None = None) -> None:
        # Shared across nodes (Redis): a proof replayed at another node is refused too.
        self._replay = replay
        self.nonces = DpopNonces(_nonce_secret(secrets_dir), 300, clock) if cfg.dpop_nonce_required else None
        self.verifier = DpopVerifier(DpopConfig(algorithms=list(DPOP_ALGS), require_nonce=cfg.dpop_nonce_required),
                                     clock=clock, nonces=self.nonces)
        self._token_url = f"{cfg.issuer}/oauth2/token"

    def nonce_headers(self) -> list[tuple[str, str]]:
        """A fresh ``DPoP-Nonce`` for the next proof (§8.2), when we use nonces."""
        return [("DPoP-Nonce", self.nonces.issue())] if self.nonces is not None else []

    def check(self, request: OAuthRequest) -> AsResponse | None:
        """Verify a ``DPoP`` header if there is one and set `request.dpop_jkt`; an error
        response when the proof is refused. No header: nothing to do here (a client
        that must use DPoP is refused once it is authenticated, `require_dpop`)."""
        req = request.as_request
        proof = req.headers.get("dpop")
        if proof is None:
            return None
        if "dpop" in req.repeated_headers:  # §4.3 point 1: exactly one DPoP header
            req.audit["dpop"] = "dpop.multiple"
            return oauth_error("invalid_dpop_proof", "The DPoP proof is not valid.", reason="oauth.dpop.multiple")
        try:
            result = self.verifier.verify(proof.encode("latin-1"), method=req.method, url=self._token_url,
                                          access_token=None, expected_jkt=None)
        except DpopRefusal as refusal:
            req.audit["dpop"] = refusal.reason
            if refusal.use_dpop_nonce:
                return oauth_error("use_dpop_nonce", "Authorization server requires a nonce in the DPoP proof.",
                                   reason=f"oauth.{refusal.reason}", headers=self.nonce_headers())
            return oauth_error("invalid_dpop_proof", "The DPoP proof is not valid.", reason=f"oauth.{refusal.reason}")
        request.dpop_jkt = result.jkt
        req.audit["dpop_jkt"] = result.jkt
        request.dpop_jti = result.jti
        return None

    async def check_shared(self, request: OAuthRequest) -> AsResponse | None:
        """`check`, then the proof's `jti` against the replay cache shared by every node
        (§11.1); a cache that cannot answer refuses (fail closed)."""
        refused = self.check(request)
        if refused is not None or request.dpop_jkt is None or self._replay is None:
            return refused
        try:
            fresh = await self._replay.first_use("dpop-as", f"{request.dpop_jkt}|{request.dpop_jti}",
                                                 self.verifier.replay.ttl)
        except BackendUnavailable:  # fail closed, as a retryable 503 rather than a 500
            return oauth_error("temporarily_unavailable", "DPoP proofs cannot be checked right now; retry shortly.",
                               503, reason="oauth.dpop.replay_unavailable", headers=[("retry-after", "1")])
        if not fresh:
            request.as_request.audit["dpop"] = "dpop.replay"
            return oauth_error("invalid_dpop_proof", "The DPoP proof is not valid.", reason="oauth.dpop.replay")
        return None


def bind_certificate(request: OAuthRequest) -> None:
    """RFC 8705 §3: a request over mutual TLS (a verified client certificate, directly or
    from a trusted proxy) gets certificate-bound tokens (`cnf.x5t#S256`)."""
    der = request.as_request.client_cert_der
    if der is not None:
        request.cert_x5t = cert_thumbprint(der)
