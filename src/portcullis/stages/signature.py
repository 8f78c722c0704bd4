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
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.credentials.rfc9421 import (
    NonceCache,
    RequestSignatureVerifier,
    ResponseSigner,
    SignatureKeyConfig,
    SignaturePolicy,
    SignatureRefusal,
)
from portcullis.exchange import Exchange, UpstreamResponse
from portcullis.netutil import TrustedProxies, client_scheme
from portcullis.problems import Problem
from portcullis.stages.proxy import (
    BodyTooLargeError,
    ClientDisconnectedError,
    gone_problem,
    read_body,
    too_large_problem,
)
from portcullis.traffic.protocols import BackendUnavailable, ReplayCache


class ResponseSigningConfig(BaseModel):
    """The gateway's own key for signing responses (an asymmetric one: partners verify
    with its public half; an HMAC secret would have to be shared with every partner)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=1, max_length=256)
    alg: Literal["ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "rsa-v1_5-sha256"] = "ed25519"
    private_key_file: str


class SignaturesConfig(BaseModel):
    """`signatures:` trusted partner keys, the verification policy, response signing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[SignatureKeyConfig] = Field(default_factory=list)
    policy: SignaturePolicy = SignaturePolicy()
    response_signing: ResponseSigningConfig | None = None
    max_response_bytes: int = Field(default=1024 * 1024, gt=0, le=64 * 1024 * 1024)
    # OAuth clients (a token's `client_id`) whose requests must be signed, and by which key:
    # the access-token counterpart of an API key's `--signing-key` binding.
    clients: dict[str, str] = Field(default_factory=dict)

    @field_validator("keys")
    @classmethod
    def _unique(cls, v: list[SignatureKeyConfig]) -> list[SignatureKeyConfig]:
        ids = [k.key_id for k in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"key_id listed more than once: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _client_keys_exist(self) -> SignaturesConfig:
        known = {k.key_id for k in self.keys}
        missing = sorted({kid for kid in self.clients.values() if kid not in known})
        if missing:
            raise ValueError(f"clients name keys not in signatures.keys: {', '.join(missing)}")
        return self


def _accept_signature(policy: SignaturePolicy) -> tuple[bytes, bytes]:
    """RFC 9421 §5.1 ``Accept-Signature``: what a valid signature must cover."""
    components = list(dict.fromkeys([*policy.required_components, "content-digest"]))
    params = ";created" + (";nonce" if policy.require_nonce else "") + ";keyid"
    inner = " ".join(f'"{c}"' for c in components)
    return (b"accept-signature", f"sig1=({inner}){params}".encode())


class SignatureStage:
    """Verifies request signatures; signs responses where configured."""

    name: ClassVar[str] = "signature"

    def __init__(self, cfg: SignaturesConfig, max_body_bytes: int, base: Path | None = None,
                 trusted: TrustedProxies | None = None, replay: ReplayCache | None = None) -> None:
        self._cfg = cfg
        # Shared across gateway nodes (Redis): a nonce replayed at another node is refused.
        self._replay = replay
        self._trusted = trusted
        policy = cfg.policy
        self._nonce_ttl = float(policy.max_age_seconds + policy.clock_skew_seconds)
        nonces = NonceCache(policy.max_age_seconds + policy.clock_skew_seconds)
        keys = [k.model_copy(update={"public_key_file": str(base / k.public_key_file)})
                if base is not None and k.public_key_file and not Path(k.public_key_file).is_absolute() else k
                for k in cfg.keys]  # files relative to the config file, like every other path
        self._verifier = RequestSignatureVerifier(keys, policy, nonces=nonces)
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
        p = ex.principal
        bound = p.signing_key_id if p is not None else None
        if bound is None and p is not None and p.credential_kind != "api_key" and p.client_id is not None:
            bound = self._cfg.clients.get(p.client_id)
        if not route.config.require_signature and bound is None:
            return None
        body: bytes | None = None
        if ex.header(b"transfer-encoding") is not None or ex.header(b"content-length") not in (None, b"0"):
            try:
                body = await read_body(ex, self._max_body)
            except BodyTooLargeError:
                return too_large_problem()
            except ClientDisconnectedError:
                return gone_problem()
            ex.facts["body"] = body
        try:
            result = self._verifier.verify(
                ex.method, self._scheme(ex), ex.host, ex.raw_path.decode("ascii"),
                ex.query.decode("ascii", "replace"), ex.headers, body)
        except SignatureRefusal as refusal:
            return self._refuse(refusal.reason, refusal.detail)
        if bound is not None and result.key_id != bound:
            return self._refuse("sig.wrong_key", "This credential's requests must be signed with its own key.")
        try:
            fresh = self._replay is None or result.nonce is None or await self._replay.first_use(
                "sig", f"{result.key_id}|{result.nonce}", self._nonce_ttl)
        except BackendUnavailable:  # fail closed, as a retryable 503 rather than a 500
            return Problem(503, "service-unavailable", "sig.replay_unavailable",
                           "Request signatures cannot be checked right now; retry shortly.",
                           headers=[(b"retry-after", b"1")])
        if not fresh:
            return self._refuse("sig.replay", "The signature's nonce was already used.")
        ex.facts["signature_key"] = result.key_id
        return None

    def _scheme(self, ex: Exchange) -> str:
        """The scheme the client used: ours, or a trusted TLS-terminating proxy's."""
        return client_scheme(str(ex.scope.get("scheme", "http")), ex.facts.get("peer", ""),
                             ex.header(b"x-forwarded-proto"), self._trusted)

    async def on_response(self, ex: Exchange) -> None:
        up = ex.upstream
        route = ex.route
        if self._signer is None or up is None or route is None or not route.config.sign_responses:
            return
        if ex.method == "HEAD":
            return  # no body to cover: a digest of nothing would misdescribe the resource
        chunks: list[bytes] = []
        size = 0
        if up.body is not None:
            async for chunk in up.body:
                size += len(chunk)
                if size > self._cfg.max_response_bytes:
                    ex.facts["response_too_large"] = True
                    raise BodyTooLargeError  # the app answers 502 (upstream.response_refused)
                chunks.append(chunk)
        body = b"".join(chunks)
        signed = self._signer.sign(up.status, up.headers, body)
        names = {k for k, _ in signed} | {b"content-length"}
        headers = [(k, v) for k, v in up.headers if k not in names]
        headers += [*signed, (b"content-length", str(len(body)).encode())]
        ex.upstream = UpstreamResponse(up.status, headers, _one(body) if up.body is not None else None, up.release,
                                       content_length=len(body))


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body
