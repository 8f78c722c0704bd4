"""Passkeys end to end over real HTTP with soft-webauthn as the authenticator:
registration from the account page, passwordless login, a passkey as the second factor
and under a phishing-resistant tenant policy, and the attacks a relying party must refuse.

soft-webauthn 0.1.3 speaks bytes (not WebAuthn's JSON) and never sets the UV flag;
`Authenticator` below adapts its output to the JSON py_webauthn 3 reads and, when asked,
sets UV (re-signing the assertion with the device's key) — in the test, not the library.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyotp
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from soft_webauthn import SoftWebauthnDevice

from portcullis.credentials.acr import ACR_PHISHING_RESISTANT
from tests.integration.harness import find_audit_event
from tests.integration.oauth.conftest import AsEnv
from tests.integration.oauth.test_login import Browser, csrf_of, ident, new_user


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Authenticator:
    """A soft-webauthn device speaking the WebAuthn JSON serialisation."""

    def __init__(self) -> None:
        self.device = SoftWebauthnDevice()

    def create(self, options: dict[str, Any], origin: str, *, uv: bool = True) -> dict[str, Any]:
        opts = {"publicKey": {**options, "challenge": unb64u(options["challenge"]),
                              "user": {**options["user"], "id": unb64u(options["user"]["id"])}}}
        out = self.device.create(opts, origin)
        att = cbor.decode(out["response"]["attestationObject"])
        if uv:
            auth = bytearray(att["authData"])
            auth[32] |= 0x04  # UV; "none" attestation carries no signature over it
            att["authData"] = bytes(auth)
        return {"id": b64u(out["rawId"]), "rawId": b64u(out["rawId"]), "type": "public-key",
                "clientExtensionResults": {},
                "response": {"clientDataJSON": b64u(out["response"]["clientDataJSON"]),
                             "attestationObject": b64u(cbor.encode(att)), "transports": ["internal"]}}

    def get(self, options: dict[str, Any], origin: str, *, uv: bool = True) -> dict[str, Any]:
        opts = {"publicKey": {**options, "challenge": unb64u(options["challenge"])}}
        out = self.device.get(opts, origin)
        auth_data = out["response"]["authenticatorData"]
        signature = out["response"]["signature"]
        if uv:
            flags = bytes([auth_data[32] | 0x04])
            auth_data = auth_data[:32] + flags + auth_data[33:]
            client_hash = hashes.Hash(hashes.SHA256())
            client_hash.update(out["response"]["clientDataJSON"])
            signature = self.device.private_key.sign(auth_data + client_hash.finalize(), ec.ECDSA(hashes.SHA256()))
        return {"id": b64u(out["rawId"]), "rawId": b64u(out["rawId"]), "type": "public-key",
                "clientExtensionResults": {},
                "response": {"clientDataJSON": b64u(out["response"]["clientDataJSON"]),
                             "authenticatorData": b64u(auth_data), "signature": b64u(signature),
                             "userHandle": b64u(out["response"]["userHandle"])}}


class PasskeyBrowser(Browser):
    def json(self, path: str, body: dict[str, Any], token: str, **headers: str) -> requests.Response:
        return self.s.post(self.base + path, data=json.dumps(body), allow_redirects=False, timeout=10,
                           headers={"content-type": "application/json", "x-csrf-token": token, **headers})

    def register(self, auth: Authenticator, **kw: Any) -> requests.Response:
        token = csrf_of(self.get("/account/security").text)
        r = self.json("/account/passkey/register/options", {}, token)
        assert r.status_code == 200, r.text
        opts = r.json()
        return self.json("/account/passkey/register/verify",
                         {"credential": auth.create(opts, self.base, **kw), "name": "Test key"}, token)

    def start(self, path: str = "/account/login?return_to=/v1/health") -> tuple[str, dict[str, Any]]:
        page = self.get(path)
        assert page.status_code == 200, page.status_code
        token = csrf_of(page.text)
        r = self.json("/account/passkey/login/options", {}, token)
        assert r.status_code == 200, r.text
        return token, r.json()

    def sign_in(self, cred: dict[str, Any], token: str) -> requests.Response:
        return self.json("/account/passkey/login/verify", {"credential": cred}, token)


def registered(as_env: AsEnv, tenant: str = "acme") -> tuple[str, Authenticator]:
    name, _ = new_user(as_env, tenant)
    b = PasskeyBrowser(as_env)
    assert b.login(name).status_code == 303
    auth = Authenticator()
    r = b.register(auth)
    assert r.status_code == 200 and r.json() == {"redirect": "/account/security"}, r.text
    return name, auth


def reason(as_env: AsEnv, r: requests.Response) -> str:
    return find_audit_event(as_env.gateway, r.headers["x-request-id"]).reason


def test_register_then_passwordless_login(as_env: AsEnv) -> None:
    name, auth = registered(as_env)
    user = ident(as_env).users.by_username(name)
    assert user and [p.name for p in ident(as_env).passkeys.for_user(user.user_id)] == ["Test key"]
    b = PasskeyBrowser(as_env)
    token, opts = b.start()
    assert opts["userVerification"] == "required" and opts["rpId"] == "127.0.0.1"
    r = b.sign_in(auth.get(opts, as_env.issuer), token)
    assert r.status_code == 200 and r.json() == {"redirect": "/v1/health"}, r.text
    state = ident(as_env).store.lookup(b.cookie("pc_session") or "")
    assert state and state.acr == ACR_PHISHING_RESISTANT and state.username == name
    assert {"hwk", "mfa"} <= set(state.amr) and "pwd" not in state.amr
    assert reason(as_env, r) == "login.ok"
    assert ident(as_env).passkeys.for_user(state.user_id)[0].sign_count == 1


def test_registration_without_user_verification_is_refused(as_env: AsEnv) -> None:
    name, _ = new_user(as_env)
    b = PasskeyBrowser(as_env)
    b.login(name)
    r = b.register(Authenticator(), uv=False)
    assert r.status_code == 400 and reason(as_env, r) == "passkey.bad_registration"


def test_assertion_without_user_verification_is_refused(as_env: AsEnv) -> None:
    _, auth = registered(as_env)
    b = PasskeyBrowser(as_env)
    token, opts = b.start()
    r = b.sign_in(auth.get(opts, as_env.issuer, uv=False), token)
    assert r.status_code == 401 and reason(as_env, r) == "login.bad_passkey"
    assert b.cookie("pc_session") is None


def test_replayed_assertion_is_refused(as_env: AsEnv) -> None:
    _, auth = registered(as_env)
    b = PasskeyBrowser(as_env)
    token, opts = b.start()
    cred = auth.get(opts, as_env.issuer)
    assert b.sign_in(cred, token).status_code == 200
    # The same assertion in another login: it signed another challenge ...
    c = PasskeyBrowser(as_env)
    token, _ = c.start()
    r = c.sign_in(cred, token)
    assert r.status_code == 401 and reason(as_env, r) == "login.bad_passkey"
    # ... and that login's challenge was spent by the failed attempt (single use).
    r = c.sign_in(cred, token)
    assert r.status_code == 401 and reason(as_env, r) == "passkey.no_challenge"
    r = b.sign_in(cred, token)
    assert r.status_code in (400, 401, 403)
    assert c.cookie("pc_session") is None


def test_cloned_authenticator_counter_is_refused(as_env: AsEnv) -> None:
    _, auth = registered(as_env)
    b = PasskeyBrowser(as_env)
    token, opts = b.start()
    assert b.sign_in(auth.get(opts, as_env.issuer), token).status_code == 200
    auth.device.sign_count -= 1  # a clone that lags behind
    c = PasskeyBrowser(as_env)
    token, opts = c.start()
    r = c.sign_in(auth.get(opts, as_env.issuer), token)
    assert r.status_code == 401 and reason(as_env, r) == "login.bad_passkey"


@pytest.mark.parametrize("attack", ["origin", "rp"])
def test_wrong_origin_or_relying_party_is_refused(as_env: AsEnv, attack: str) -> None:
    _, auth = registered(as_env)
    b = PasskeyBrowser(as_env)
    token, opts = b.start()
    if attack == "origin":  # a phishing site relaying our challenge
        cred = auth.get(opts, "https://evil.example")
    else:  # an assertion made for another relying party
        auth.device.rp_id = "evil.example"
        cred = auth.get({**opts, "rpId": "evil.example"}, as_env.issuer)
    r = b.sign_in(cred, token)
    assert r.status_code == 401 and reason(as_env, r) == "login.bad_passkey"
    assert b.cookie("pc_session") is None


def test_passkey_endpoints_need_csrf(as_env: AsEnv) -> None:
    b = PasskeyBrowser(as_env)
    token, _ = b.start()
    r = b.json("/account/passkey/login/options", {}, "forged")
    assert r.status_code == 403 and reason(as_env, r) == "csrf.mismatch"
    r = b.json("/account/passkey/login/options", {}, token, Origin="https://evil.example")
    assert r.status_code == 403 and reason(as_env, r) == "csrf.cross_origin"
    r = b.json("/account/passkey/register/options", {}, token)
    assert r.status_code == 403 and reason(as_env, r) == "passkey.not_fresh"  # no session


def test_passkey_login_is_not_blocked_by_the_password_lock(as_env: AsEnv) -> None:
    name, auth = registered(as_env)
    t = as_env.ctx.cfg.login_throttle
    throttle = ident(as_env).throttle
    account = throttle.account_key(name)
    for _ in range(t.lock_after_failures):
        throttle.failure(account, None)  # an attacker's guesses from many addresses
    b = PasskeyBrowser(as_env)
    r = b.login(name)
    assert r.status_code == 429 and reason(as_env, r) == "login.locked"
    token, opts = b.start()
    r = b.sign_in(auth.get(opts, as_env.issuer), token)
    assert r.status_code == 200
    assert throttle.failures(account) == 0  # a completed login resets the account


def test_phishing_resistant_tenant_needs_a_passkey(as_env: AsEnv) -> None:
    as_env.ctx.clients.create_tenant("secure-co", "phishing_resistant")
    name, secret = new_user(as_env, "secure-co", totp=True)
    b = PasskeyBrowser(as_env)
    r = b.login(name)
    assert r.status_code == 303 and r.headers["location"] == "/account/login/enroll"
    page = b.get("/account/login/enroll")
    assert "totp-secret" not in page.text
    token = csrf_of(page.text)
    # Enrol a passkey (no session exists yet: the flow allows this one registration) ...
    opts = b.json("/account/passkey/register/options", {}, token).json()
    auth = Authenticator()
    r = b.json("/account/passkey/register/verify", {"credential": auth.create(opts, as_env.issuer)}, token)
    assert r.status_code == 200 and r.json() == {"redirect": "/account/login/mfa"}
    assert b.cookie("pc_session") is None
    # ... then TOTP is refused at the second step, and the passkey is accepted.
    page = b.get("/account/login/mfa")
    r = b.post("/account/login/mfa", {"code": pyotp.TOTP(secret or "").now(), "csrf_token": csrf_of(page.text)})
    assert r.status_code == 403 and reason(as_env, r) == "login.factor_not_allowed"
    token, opts = b.start("/account/login/mfa")
    assert len(opts["allowCredentials"]) == 1
    r = b.sign_in(auth.get(opts, as_env.issuer), token)
    assert r.status_code == 200
    state = ident(as_env).store.lookup(b.cookie("pc_session") or "")
    assert state and state.acr == ACR_PHISHING_RESISTANT and {"pwd", "hwk", "mfa"} <= set(state.amr)


def test_a_passkey_of_another_user_is_refused_as_second_factor(as_env: AsEnv) -> None:
    _, other_auth = registered(as_env)
    name, _ = registered(as_env)
    b = PasskeyBrowser(as_env)
    r = b.login(name)  # has a passkey: asked for a second factor
    assert r.status_code == 303 and r.headers["location"] == "/account/login/mfa"
    token, opts = b.start("/account/login/mfa")
    r = b.sign_in(other_auth.get(opts, as_env.issuer), token)
    assert r.status_code == 401 and reason(as_env, r) == "login.passkey_wrong_user"
    assert b.cookie("pc_session") is None  # the password alone made no session
