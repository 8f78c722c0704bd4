"""WebAuthn passkeys (W3C WebAuthn Level 2) with py_webauthn: registration and
authentication ceremonies and the credential store.

- Relying party: `rp_id` = the issuer's host, the only accepted origin = the issuer
  (§7.1 step 9 and 13, §7.2 step 13 and 15).
- User verification required in both ceremonies (§7.1 step 15, §7.2 step 17): a passkey
  then proves possession *and* a PIN or biometric, so it alone satisfies phishing-resistant
  MFA.
- Challenges: 32 random bytes, one outstanding per (browser session or login flow,
  ceremony), single use (deleted when read, whatever the outcome) and valid
  `CHALLENGE_SECONDS`.
- The signature counter must grow when the authenticator keeps one (§7.2 step 21; a clone
  shows a counter that went backwards); updated with compare-and-set.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url, parse_authentication_credential_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from portcullis.oauth.db import AuthDb
from portcullis.oauth.identity import tables
from portcullis.oauth.identity.keys import keyed_hash

CHALLENGE_SECONDS = 120
TIMEOUT_MS = 60_000
MAX_PASSKEYS = 20


class PasskeyError(Exception):
    """A ceremony failed; `reason` is the audit code, `str(self)` is user-safe."""

    def __init__(self, reason: str, message: str = "The passkey could not be verified.") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Passkey:
    credential_id: str
    user_id: str
    name: str
    sign_count: int
    created_at: float
    last_used_at: float | None


class Passkeys:
    """Ceremonies for one relying party (the issuer)."""

    def __init__(self, db: AuthDb, issuer: str, key: bytes, clock: Callable[[], float], rp_name: str = "Portcullis"
                 ) -> None:
        self._db = db
        self.origin = issuer.rstrip("/")
        self.rp_id = urlsplit(self.origin).hostname or ""
        self.rp_name = rp_name
        self._key = key
        self._clock = clock

    # --- store ---
    def for_user(self, user_id: str) -> list[Passkey]:
        p = tables.passkeys
        with self._db.engine.connect() as conn:
            rows = conn.execute(sa.select(p).where(p.c.user_id == user_id).order_by(p.c.created_at)).all()
        return [Passkey(r.credential_id, r.user_id, r.name, int(r.sign_count), float(r.created_at), r.last_used_at)
                for r in rows]

    def delete(self, user_id: str, credential_id: str) -> bool:
        p = tables.passkeys
        with self._db.begin() as conn:
            n = conn.execute(p.delete().where((p.c.user_id == user_id) & (p.c.credential_id == credential_id)))
        return bool(n.rowcount)

    # --- challenges ---
    def _binding(self, binding: str, purpose: str) -> str:
        return keyed_hash(self._key, f"{purpose}\x00{binding}")

    def _store_challenge(self, binding: str, purpose: str, user_id: str | None) -> bytes:
        challenge = secrets.token_bytes(32)
        b = self._binding(binding, purpose)
        c = tables.webauthn_challenges
        now = self._clock()
        with self._db.begin() as conn:
            conn.execute(c.delete().where((c.c.binding == b) | (c.c.expires_at < now)))
            conn.execute(c.insert().values(binding=b, challenge=challenge, user_id=user_id,
                                           expires_at=now + CHALLENGE_SECONDS))
        return challenge

    def _take_challenge(self, binding: str, purpose: str) -> tuple[bytes, str | None]:
        b = self._binding(binding, purpose)
        c = tables.webauthn_challenges
        with self._db.begin() as conn:
            row = conn.execute(sa.select(c).where(c.c.binding == b)).first()
            # Whoever deletes the row owns the challenge: two concurrent requests may both
            # read it (PostgreSQL, READ COMMITTED), but only one DELETE removes it.
            if row is None or conn.execute(c.delete().where(
                    (c.c.binding == b) & (c.c.challenge == row.challenge))).rowcount != 1:
                raise PasskeyError("passkey.no_challenge", "Start again: the passkey request expired.")
        if row.expires_at <= self._clock():
            raise PasskeyError("passkey.challenge_expired", "Start again: the passkey request expired.")
        return bytes(row.challenge), row.user_id

    # --- registration ---
    def registration_options(self, binding: str, user_id: str, username: str) -> str:
        """The options JSON for navigator.credentials.create()."""
        existing = self.for_user(user_id)
        if len(existing) >= MAX_PASSKEYS:
            raise PasskeyError("passkey.too_many", f"At most {MAX_PASSKEYS} passkeys per account.")
        challenge = self._store_challenge(binding, "register", user_id)
        options = generate_registration_options(
            rp_id=self.rp_id, rp_name=self.rp_name, user_id=user_id.encode(), user_name=username,
            challenge=challenge, timeout=TIMEOUT_MS, attestation=AttestationConveyancePreference.NONE,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=UserVerificationRequirement.REQUIRED),
            exclude_credentials=[PublicKeyCredentialDescriptor(id=_b64decode(p.credential_id)) for p in existing],
        )
        return str(options_to_json(options))

    def register(self, binding: str, user_id: str, credential: dict[str, Any], name: str) -> Passkey:
        """Verify a navigator.credentials.create() result and store the credential."""
        challenge, for_user = self._take_challenge(binding, "register")
        if for_user != user_id:
            raise PasskeyError("passkey.wrong_user")
        try:
            verified = verify_registration_response(
                credential=credential, expected_challenge=challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origin, require_user_verification=True)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise PasskeyError("passkey.bad_registration", "The passkey could not be registered.") from exc
        cid = bytes_to_base64url(verified.credential_id)
        now = self._clock()
        transports = credential.get("response", {}).get("transports") if isinstance(credential, dict) else None
        p = tables.passkeys
        try:
            with self._db.begin() as conn:
                if conn.execute(sa.select(p.c.user_id).where(p.c.credential_id == cid)).first():
                    raise PasskeyError("passkey.exists", "This passkey is already registered.")
                conn.execute(p.insert().values(
                    credential_id=cid, user_id=user_id, public_key=verified.credential_public_key,
                    sign_count=verified.sign_count, name=(name.strip() or "Passkey")[:100],
                    transports=json.dumps([t for t in transports if isinstance(t, str)][:10]
                                          if isinstance(transports, list) else []),
                    created_at=now))
        except IntegrityError:
            # Registered concurrently (the primary key decides).
            raise PasskeyError("passkey.exists", "This passkey is already registered.") from None
        return Passkey(cid, user_id, name, verified.sign_count, now, None)

    # --- authentication ---
    def authentication_options(self, binding: str, user_id: str | None) -> str:
        """Options for navigator.credentials.get(): the user's credentials when the user
        is known (second factor, step-up), else any discoverable credential."""
        allow = [PublicKeyCredentialDescriptor(id=_b64decode(p.credential_id)) for p in self.for_user(user_id)] \
            if user_id else []
        challenge = self._store_challenge(binding, "login", user_id)
        options = generate_authentication_options(
            rp_id=self.rp_id, challenge=challenge, timeout=TIMEOUT_MS, allow_credentials=allow,
            user_verification=UserVerificationRequirement.REQUIRED)
        return str(options_to_json(options))

    def authenticate(self, binding: str, credential: dict[str, Any]) -> str:
        """Verify a navigator.credentials.get() result; returns the user id. The challenge
        is spent whatever the outcome."""
        challenge, for_user = self._take_challenge(binding, "login")
        try:
            parsed = parse_authentication_credential_json(credential)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise PasskeyError("login.bad_passkey") from exc
        cid = bytes_to_base64url(parsed.raw_id)
        p = tables.passkeys
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(p).where(p.c.credential_id == cid)).first()
        if row is None:
            raise PasskeyError("login.unknown_passkey")
        if for_user is not None and row.user_id != for_user:
            raise PasskeyError("login.passkey_wrong_user")
        if parsed.response.user_handle is not None and parsed.response.user_handle != row.user_id.encode():
            raise PasskeyError("login.passkey_wrong_user")
        try:
            verified = verify_authentication_response(
                credential=parsed, expected_challenge=challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origin, credential_public_key=bytes(row.public_key),
                credential_current_sign_count=int(row.sign_count), require_user_verification=True)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise PasskeyError("login.bad_passkey") from exc
        with self._db.begin() as conn:
            n = conn.execute(p.update().where((p.c.credential_id == cid) & (p.c.sign_count == row.sign_count))
                             .values(sign_count=verified.new_sign_count, last_used_at=self._clock())).rowcount
        if not n:
            raise PasskeyError("login.passkey_counter_race")
        return str(row.user_id)


def _b64decode(s: str) -> bytes:
    from webauthn import base64url_to_bytes

    return bytes(base64url_to_bytes(s))
