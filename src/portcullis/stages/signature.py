"""signature: RFC 9421 signed requests (and signed responses) for partner integrations.

Runs after authenticate: a request must carry a valid signature when its route says
``require_signature`` or when its credential is bound to a signing key (an API key
created with ``--signing-key``); a credential bound to a key must be signed by *that*
key. The body is read here (bounded by ``normalize.max_body_bytes``) so that
``Content-Digest`` (RFC 9530) can be recomputed; the proxy forwards the same bytes.
On routes with ``sign_responses``, the upstream's answer is signed by the gateway's
key, covering ``@status``, ``content-type`` and ``content-digest`` (RFC 9421 §2.2.9).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from portcullis.credentials.rfc9421 import (
    Alg,
    NonceCache,
    RequestSignatureVerifier,
    ResponseSigner,
    SignatureKeyConfig,
    SignaturePolicy,
    SignatureRefusal,
)
from portcullis.exchange import Exchange, UpstreamResponse
from portcullis.problems import Problem
from portcullis.stages.proxy import BodyTooLargeError, ClientDisconnectedError, read_body


class ResponseSigningConfig(BaseModel):
    """The gateway's own key for signing responses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=1, max_length=256)
    alg: Alg = "ed25519"
    private_key_file: str


class SignaturesConfig(BaseModel):
    """`signatures:` trusted partner keys, the verification policy, response signing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[SignatureKeyConfig] = Field(default_factory=list)
    policy: SignaturePolicy = SignaturePolicy()
    response_signing: ResponseSigningConfig | None = None
    max_response_bytes: int = Field(default=1024 * 1024, gt=0, le=64 * 1024 * 1024)


def _accept_signature(policy: SignaturePolicy) -> tuple[bytes, bytes]:
    """RFC 9421 §5.1 ``Accept-Signature``: what a valid signature must cover."""
    components = [*policy.required_components, "content-digest"]
    params = ";created" + (";nonce" if policy.require_nonce else "") + ";keyid"
    inner = " ".join(f'"{c}"' for c in components)
    return (b"accept-signature", f"sig1=({inner}){params}".encode())


class SignatureStage:
    """Verifies request signatures; signs responses where configured."""

    name: ClassVar[str] = "signature"

    def __init__(self, cfg: SignaturesConfig, max_body_bytes: int, base: Path | None = None) -> None:
        self._cfg = cfg
        policy = cfg.policy
        nonces = NonceCache(policy.max_age_seconds + policy.clock_skew_seconds)
        self._verifier = RequestSignatureVerifier(list(cfg.keys), policy, nonces=nonces)
        self._max_body = max_body_bytes
        self._accept = _accept_signature(policy)
        self._signer: ResponseSigner | None = None
        rs = cfg.response_signing
        if rs is not None:
            path = Path(rs.private_key_file)
            if base is not None and not path.is_absolute():
                path = base / path
            self._signer = ResponseSigner(rs.key_id, path.read_text(encoding="utf-8"), rs.alg)

    def _refuse(self, reason: str, detail: str = "The request signature is not valid.") -> Problem:
        return Problem(401, "invalid-credential", reason, detail, headers=[self._accept])

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return None
        bound = ex.principal.signing_key_id if ex.principal is not None else None
        if not route.config.require_signature and bound is None:
            return None
        body: bytes | None = None
        if ex.header(b"transfer-encoding") is not None or ex.header(b"content-length") not in (None, b"0"):
            try:
                body = await read_body(ex, self._max_body)
            except BodyTooLargeError:
                return Problem(413, "payload-too-large", "request.body_too_large", "The request body is too large.")
            except ClientDisconnectedError:
                return Problem(400, "bad-request", "client.disconnected", "The client went away.")
            ex.facts["body"] = body
        try:
            result = self._verifier.verify(
                ex.method, str(ex.scope.get("scheme", "http")), ex.host, ex.raw_path.decode("ascii"),
                ex.query.decode("ascii", "replace"), ex.headers, body)
        except SignatureRefusal as refusal:
            return self._refuse(refusal.reason, refusal.detail)
        if bound is not None and result.key_id != bound:
            return self._refuse("sig.wrong_key", "This credential's requests must be signed with its own key.")
        ex.facts["signature_key"] = result.key_id
        return None

    async def on_response(self, ex: Exchange) -> None:
        up = ex.upstream
        route = ex.route
        if self._signer is None or up is None or route is None or not route.config.sign_responses:
            return
        chunks: list[bytes] = []
        size = 0
        if up.body is not None:
            async for chunk in up.body:
                size += len(chunk)
                if size > self._cfg.max_response_bytes:
                    ex.facts["response_too_large"] = True
                    raise BodyTooLargeError  # the app cuts the connection and records why
                chunks.append(chunk)
        body = b"".join(chunks)
        signed = self._signer.sign(up.status, up.headers, body)
        names = {k for k, _ in signed} | {b"content-length"}
        headers = [(k, v) for k, v in up.headers if k not in names]
        headers += [*signed, (b"content-length", str(len(body)).encode())]
        ex.upstream = UpstreamResponse(up.status, headers, _one(body) if up.body is not None else None, up.release)


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body
