"""The identity area's tables on the authorization server's store (oauth/db.py)."""

from __future__ import annotations

import sqlalchemy as sa

from portcullis.oauth.db import metadata

users = sa.Table(
    "identity_users", metadata,
    sa.Column("user_id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(100), nullable=False, index=True),
    # Lower-cased, unique across tenants: the login form asks for the username alone.
    sa.Column("username", sa.String(254), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),           # argon2id PHC string
    sa.Column("roles", sa.Text, nullable=False),                   # JSON list
    sa.Column("totp_secret", sa.Text, nullable=True),              # AES-GCM sealed (totp.SecretBox)
    sa.Column("totp_pending", sa.Text, nullable=True),             # sealed, awaiting its first code
    sa.Column("totp_last_step", sa.BigInteger, nullable=True),     # RFC 6238 T of the last accepted code
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("password_changed_at", sa.Float, nullable=False),
    sa.Column("disabled_at", sa.Float, nullable=True),
)

recovery_codes = sa.Table(
    "identity_recovery_codes", metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),       # HMAC-SHA256 under the recovery key
    sa.Column("user_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float, nullable=True),
)

passkeys = sa.Table(
    "identity_passkeys", metadata,
    sa.Column("credential_id", sa.String(1400), primary_key=True),  # base64url
    sa.Column("user_id", sa.String(40), nullable=False, index=True),
    sa.Column("public_key", sa.LargeBinary, nullable=False),         # COSE key
    sa.Column("sign_count", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("transports", sa.Text, nullable=False),                # JSON list
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=True),
)

webauthn_challenges = sa.Table(
    "identity_webauthn_challenges", metadata,
    sa.Column("binding", sa.String(64), primary_key=True),           # session/flow hash + purpose
    sa.Column("challenge", sa.LargeBinary, nullable=False),
    sa.Column("user_id", sa.String(40), nullable=True),
    sa.Column("expires_at", sa.Float, nullable=False),
)

sessions = sa.Table(
    "identity_sessions", metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),           # HMAC of the cookie value
    sa.Column("user_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("auth_time", sa.Float, nullable=False),
    sa.Column("amr", sa.Text, nullable=False),                       # JSON list (RFC 8176)
    sa.Column("acr", sa.String(64), nullable=False),
)

login_flows = sa.Table(
    "identity_login_flows", metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("return_to", sa.Text, nullable=False),
    sa.Column("want_acr", sa.String(64), nullable=True),
    sa.Column("force", sa.Boolean, nullable=False),
    # Set once the first factor passed (or for a step-up from a live session).
    sa.Column("user_id", sa.String(40), nullable=True),
    sa.Column("amr", sa.Text, nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),               # start | mfa | enroll
    sa.Column("failures", sa.Integer, nullable=False),
)

throttle = sa.Table(
    "identity_throttle", metadata,
    sa.Column("key", sa.String(80), primary_key=True),               # acct:<keyed hash> | ip:<addr or /64>
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("window_start", sa.Float, nullable=False),
    sa.Column("last_failure", sa.Float, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=True),
)
