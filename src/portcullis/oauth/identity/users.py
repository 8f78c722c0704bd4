"""Users per tenant: argon2id passwords, TOTP, recovery codes (passkeys: passkeys.py).

`Users(ctx)` is what the CLI and the demo seeding use:

    users = Users(ctx)
    user = users.create("acme", "alice@acme.example", password, ["member"])
    secret = users.enroll_totp(user.user_id)          # base32, for an authenticator app

Usernames are email-like, lower-cased and unique across tenants (the login form asks for
the username alone). A refused password raises `WeakPasswordError` with a user-safe text.
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portcullis.oauth.identity import recovery, tables, totp
from portcullis.oauth.identity.keys import IdentityKeys
from portcullis.oauth.identity.passwords import MAX_LENGTH, PasswordHasher, PasswordPolicy, WeakPasswordError

if TYPE_CHECKING:
    from portcullis.oauth.service import AuthContext

__all__ = ["User", "UserExistsError", "Users", "WeakPasswordError"]

USERNAME = re.compile(r"^[a-z0-9._%+\-]{1,64}@[a-z0-9.\-]{1,189}$|^[a-z0-9._\-]{3,64}$")
TotpResult = Literal["ok", "bad", "replay", "none"]


class UserExistsError(Exception):
    """A user with that username already exists."""


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    tenant: str
    username: str
    roles: tuple[str, ...]
    created_at: float
    disabled_at: float | None
    has_totp: bool

    @property
    def active(self) -> bool:
        return self.disabled_at is None


def normalize_username(username: str) -> str:
    return username.strip().lower()


def _user(row: sa.Row[object]) -> User:
    m = row._mapping
    return User(user_id=m["user_id"], tenant=m["tenant"], username=m["username"],
                roles=tuple(json.loads(m["roles"])), created_at=float(m["created_at"]),
                disabled_at=m["disabled_at"], has_totp=m["totp_secret"] is not None)


class Users:
    """The user directory over the authorization server's store."""

    def __init__(self, ctx: AuthContext, *, hasher: PasswordHasher | None = None,
                 policy: PasswordPolicy | None = None, keys: IdentityKeys | None = None) -> None:
        self._ctx = ctx
        self._db = ctx.db
        self.hasher = hasher or PasswordHasher()
        self.policy = policy or PasswordPolicy()
        self._keys = keys or IdentityKeys.load(ctx.secrets_dir)
        self._box = totp.SecretBox(self._keys.totp)

    def _now(self) -> float:
        return self._ctx.clock()

    # --- directory ---
    def create(self, tenant: str, username: str, password: str, roles: list[str] | tuple[str, ...]) -> User:
        """A new active user. Raises ValueError (bad username, unknown tenant),
        WeakPasswordError (policy) or UserExistsError."""
        name = normalize_username(username)
        if not USERNAME.match(name):
            raise ValueError(f"username {username!r} is not email-like")
        if self._ctx.clients.tenant_policy(tenant) is None:
            raise ValueError(f"no tenant {tenant!r}")
        self.policy.check(password, name)
        uid = "usr_" + secrets.token_urlsafe(16)
        now = self._now()
        pw_hash = self.hasher.hash(password)
        try:
            with self._db.begin() as conn:
                if conn.execute(sa.select(tables.users.c.user_id).where(tables.users.c.username == name)).first():
                    raise UserExistsError(name)
                conn.execute(tables.users.insert().values(
                    user_id=uid, tenant=tenant, username=name, password_hash=pw_hash,
                    roles=json.dumps(sorted(set(roles))), created_at=now, password_changed_at=now))
        except IntegrityError:
            # A concurrent create of the same username committed between our read and insert.
            raise UserExistsError(name) from None
        user = self.get(uid)
        assert user is not None
        return user

    def get(self, user_id: str) -> User | None:
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(tables.users).where(tables.users.c.user_id == user_id)).first()
        return _user(row) if row else None

    def by_username(self, username: str) -> User | None:
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(tables.users).where(
                tables.users.c.username == normalize_username(username))).first()
        return _user(row) if row else None

    def all(self, tenant: str | None = None) -> list[User]:
        q = sa.select(tables.users).order_by(tables.users.c.username)
        if tenant is not None:
            q = q.where(tables.users.c.tenant == tenant)
        with self._db.engine.connect() as conn:
            return [_user(r) for r in conn.execute(q).all()]

    def set_password(self, user_id: str, password: str) -> None:
        """Replace the password (policy-checked) and end the user's sessions."""
        user = self.get(user_id)
        if user is None:
            raise KeyError(user_id)
        self.policy.check(password, user.username)
        pw_hash = self.hasher.hash(password)
        with self._db.begin() as conn:
            conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                password_hash=pw_hash, password_changed_at=self._now()))
        self.revoke_sessions(user_id)

    def set_roles(self, user_id: str, roles: list[str]) -> bool:
        with self._db.begin() as conn:
            n = conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                roles=json.dumps(sorted(set(roles))))).rowcount
        return bool(n)

    def disable(self, user_id: str) -> bool:
        """Disable the user and end its sessions; False if unknown or already disabled.
        Tokens already issued are revoked separately (RevocationStore, kind "sub")."""
        with self._db.begin() as conn:
            n = conn.execute(tables.users.update().where(
                (tables.users.c.user_id == user_id) & tables.users.c.disabled_at.is_(None)
            ).values(disabled_at=self._now())).rowcount
        self.revoke_sessions(user_id)
        return bool(n)

    def enable(self, user_id: str) -> bool:
        with self._db.begin() as conn:
            n = conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                disabled_at=None)).rowcount
        return bool(n)

    def revoke_sessions(self, user_id: str) -> int:
        """End every browser session of the user; returns how many."""
        with self._db.begin() as conn:
            n = conn.execute(tables.sessions.delete().where(tables.sessions.c.user_id == user_id)).rowcount
            conn.execute(tables.login_flows.delete().where(tables.login_flows.c.user_id == user_id))
        return int(n)

    # --- passwords ---
    def authenticate(self, username: str, password: str) -> tuple[User | None, str]:
        """(user, "ok") or (None, reason) with reason `login.unknown_user`,
        `login.bad_password` or `login.disabled`. Exactly one argon2 verification is done
        whatever the outcome (a dummy hash for unknown users), so the answer's timing
        does not tell whether the account exists. Rehashes on success when the
        parameters changed."""
        name = normalize_username(username)
        row = None
        if 0 < len(name) <= 254:
            with self._db.engine.connect() as conn:
                row = conn.execute(sa.select(tables.users).where(tables.users.c.username == name)).first()
        if len(password) > MAX_LENGTH * 4:
            password = password[: MAX_LENGTH * 4]  # bound the work; such a password can never match
        if row is None:
            self.hasher.verify_dummy(password)
            return None, "login.unknown_user"
        stored = row._mapping["password_hash"]
        ok = self.hasher.verify(stored, password)
        if not ok:
            return None, "login.bad_password"
        user = _user(row)
        if not user.active:
            return None, "login.disabled"
        if self.hasher.needs_rehash(stored):
            new_hash = self.hasher.hash(password)
            with self._db.begin() as conn:
                conn.execute(tables.users.update().where(
                    (tables.users.c.user_id == user.user_id) & (tables.users.c.password_hash == stored)
                ).values(password_hash=new_hash))
        return user, "ok"

    # --- TOTP ---
    def enroll_totp(self, user_id: str, secret: str | None = None) -> str:
        """Activate TOTP with `secret` (base32; generated when None) and return it — for
        the CLI and demo seeding. Replaces any previous secret."""
        secret = secret or totp.new_secret()
        if not totp.valid_secret(secret):
            raise ValueError("a TOTP secret is base32 of at least 128 bits")
        with self._db.begin() as conn:
            n = conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                totp_secret=self._box.seal(secret, user_id), totp_pending=None, totp_last_step=None)).rowcount
        if not n:
            raise KeyError(user_id)
        return secret

    def begin_totp(self, user_id: str) -> str:
        """A new pending secret, active once `confirm_totp` sees a code from it."""
        secret = totp.new_secret()
        with self._db.begin() as conn:
            conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                totp_pending=self._box.seal(secret, user_id)))
        return secret

    def pending_totp(self, user_id: str) -> str | None:
        """The secret awaiting confirmation (to show it again after a mistyped code)."""
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(tables.users.c.totp_pending).where(
                tables.users.c.user_id == user_id)).first()
        return self._box.open(row[0], user_id) if row and row[0] else None

    def confirm_totp(self, user_id: str, code: str) -> bool:
        """Activate the pending secret if `code` is current for it."""
        with self._db.begin() as conn:
            row = conn.execute(sa.select(tables.users.c.totp_pending).where(
                tables.users.c.user_id == user_id)).first()
            sealed = row[0] if row else None
            secret = self._box.open(sealed, user_id) if sealed else None
            if secret is None:
                return False
            step = totp.match_step(secret, code, self._now())
            if step is None:
                return False
            # Compare-and-set on the pending secret: of two concurrent confirmations with
            # one code exactly one activates it (and spends the step).
            n = conn.execute(tables.users.update().where(
                (tables.users.c.user_id == user_id) & (tables.users.c.totp_pending == sealed)).values(
                totp_secret=sealed, totp_pending=None, totp_last_step=step)).rowcount
        return bool(n)

    def remove_totp(self, user_id: str) -> None:
        with self._db.begin() as conn:
            conn.execute(tables.users.update().where(tables.users.c.user_id == user_id).values(
                totp_secret=None, totp_pending=None, totp_last_step=None))

    def verify_totp(self, user_id: str, code: str) -> TotpResult:
        """"ok" (and the step is spent), "bad", "replay" (a code of a step already used) or
        "none" (no TOTP enrolled)."""
        with self._db.engine.connect() as conn:
            row = conn.execute(sa.select(tables.users.c.totp_secret, tables.users.c.totp_last_step).where(
                tables.users.c.user_id == user_id)).first()
        if row is None or row[0] is None:
            return "none"
        secret = self._box.open(row[0], user_id)
        if secret is None:
            return "none"
        step = totp.match_step(secret, code, self._now())
        if step is None:
            return "bad"
        last = row[1]
        if last is not None and step <= last:
            return "replay"
        # Compare-and-set: two concurrent requests with one code, exactly one wins.
        with self._db.begin() as conn:
            n = conn.execute(tables.users.update().where(
                (tables.users.c.user_id == user_id)
                & (tables.users.c.totp_last_step.is_(None) | (tables.users.c.totp_last_step < step))
            ).values(totp_last_step=step)).rowcount
        return "ok" if n else "replay"

    # --- recovery codes ---
    def new_recovery_codes(self, user_id: str) -> list[str]:
        """Replace the user's recovery codes with 10 new ones, returned once."""
        codes = recovery.new_codes()
        now = self._now()
        with self._db.begin() as conn:
            # Lock the user's row first (PostgreSQL; a no-op on SQLite, whose DELETE takes
            # the write lock): two concurrent replacements then run one after the other
            # and only the last set survives, as on SQLite. Without it each DELETE misses
            # the other's uncommitted codes and both sets stay valid.
            conn.execute(sa.select(tables.users.c.user_id).where(tables.users.c.user_id == user_id)
                         .with_for_update())
            conn.execute(tables.recovery_codes.delete().where(tables.recovery_codes.c.user_id == user_id))
            for c in codes:
                h = recovery.code_hash(self._keys.recovery, c)
                assert h is not None
                conn.execute(tables.recovery_codes.insert().values(code_hash=h, user_id=user_id, created_at=now))
        return codes

    def use_recovery_code(self, user_id: str, code: str) -> bool:
        """Spend one of the user's codes; False if unknown, another user's or used."""
        h = recovery.code_hash(self._keys.recovery, code)
        if h is None:
            return False
        with self._db.begin() as conn:
            n = conn.execute(tables.recovery_codes.update().where(
                (tables.recovery_codes.c.code_hash == h) & (tables.recovery_codes.c.user_id == user_id)
                & tables.recovery_codes.c.used_at.is_(None)
            ).values(used_at=self._now())).rowcount
        return bool(n)

    def recovery_codes_left(self, user_id: str) -> int:
        with self._db.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tables.recovery_codes).where(
                (tables.recovery_codes.c.user_id == user_id) & tables.recovery_codes.c.used_at.is_(None)
            )).scalar_one())

    def list(self, tenant: str | None = None) -> builtins.list[User]:
        """Every user (of `tenant`), by username; same as `all`."""
        return self.all(tenant)

    def passkey_count(self, user_id: str) -> int:
        with self._db.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tables.passkeys).where(
                tables.passkeys.c.user_id == user_id)).scalar_one())


