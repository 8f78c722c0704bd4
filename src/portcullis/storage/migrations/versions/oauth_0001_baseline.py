"""Authorization server baseline: tenants, clients, grants, tokens, identity

Revision ID: oauth_0001
Revises: -
Create Date: 2026-05-01

Baseline of the oauth store: the tables as earlier versions created them with
`create_all`. Every table and index is created only if missing, so a database made by an
earlier version upgrades in place; a fresh one gets the whole schema.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "oauth_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("oauth",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table("identity_login_flows",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("return_to", sa.Text(), nullable=False),
        sa.Column("want_acr", sa.String(length=64), nullable=True),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("amr", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_identity_login_flows_expires_at"), "identity_login_flows", ["expires_at"],
                    unique=False, if_not_exists=True)
    op.create_table("identity_passkeys",
        sa.Column("credential_id", sa.String(length=1400), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("sign_count", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("transports", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("credential_id"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_identity_passkeys_user_id"), "identity_passkeys", ["user_id"],
                    unique=False, if_not_exists=True)
    op.create_table("identity_recovery_codes",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("code_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_identity_recovery_codes_user_id"), "identity_recovery_codes", ["user_id"],
                    unique=False, if_not_exists=True)
    op.create_table("identity_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
        sa.Column("auth_time", sa.Float(), nullable=False),
        sa.Column("amr", sa.Text(), nullable=False),
        sa.Column("acr", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_identity_sessions_user_id"), "identity_sessions", ["user_id"],
                    unique=False, if_not_exists=True)
    op.create_table("identity_throttle",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.Float(), nullable=False),
        sa.Column("last_failure", sa.Float(), nullable=False),
        sa.Column("locked_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("key"),
        if_not_exists=True,
    )
    op.create_table("identity_users",
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("username", sa.String(length=254), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("roles", sa.Text(), nullable=False),
        sa.Column("totp_secret", sa.Text(), nullable=True),
        sa.Column("totp_pending", sa.Text(), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("password_changed_at", sa.Float(), nullable=False),
        sa.Column("disabled_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("user_id"),
        sa.UniqueConstraint("username"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_identity_users_tenant"), "identity_users", ["tenant"], unique=False, if_not_exists=True)
    op.create_table("identity_webauthn_challenges",
        sa.Column("binding", sa.String(length=64), nullable=False),
        sa.Column("challenge", sa.LargeBinary(), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("binding"),
        if_not_exists=True,
    )
    op.create_table("oauth_assertion_jtis",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_assertion_jtis_expires_at"), "oauth_assertion_jtis", ["expires_at"],
                    unique=False, if_not_exists=True)
    op.create_table("oauth_authorizations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("login", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("resources", sa.Text(), nullable=False),
        sa.Column("dpop_jkt", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("absolute_expires_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("revoked_reason", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_authorizations_client_id"), "oauth_authorizations", ["client_id"],
                    unique=False, if_not_exists=True)
    op.create_index(op.f("ix_oauth_authorizations_user_id"), "oauth_authorizations", ["user_id"],
                    unique=False, if_not_exists=True)
    op.create_table("oauth_clients",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=True),
        sa.Column("auth_method", sa.String(length=64), nullable=False),
        sa.Column("grant_types", sa.Text(), nullable=False),
        sa.Column("redirect_uris", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("jwks", sa.Text(), nullable=True),
        sa.Column("tls_subject_dn", sa.Text(), nullable=True),
        sa.Column("require_par", sa.Boolean(), nullable=False),
        sa.Column("require_dpop", sa.Boolean(), nullable=False),
        sa.Column("first_party", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("client_id"),
        sa.UniqueConstraint("name"),
        if_not_exists=True,
    )
    op.create_table("oauth_codes",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("redirect_uri_given", sa.Boolean(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("code_challenge", sa.String(length=128), nullable=True),
        sa.Column("code_challenge_method", sa.String(length=16), nullable=True),
        sa.Column("nonce", sa.String(length=512), nullable=True),
        sa.Column("login", sa.Text(), nullable=False),
        sa.Column("resources", sa.Text(), nullable=False),
        sa.Column("dpop_jkt", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("authorization_id", sa.String(length=64), nullable=True),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("code_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_codes_expires_at"), "oauth_codes", ["expires_at"], unique=False, if_not_exists=True)
    op.create_table("oauth_consents",
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("granted_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "client_id"),
        if_not_exists=True,
    )
    op.create_table("oauth_pending_requests",
        sa.Column("uri_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("from_par", sa.Boolean(), nullable=False),
        sa.Column("min_auth_time", sa.Float(), nullable=True),
        sa.Column("login_rounds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("uri_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_pending_requests_expires_at"), "oauth_pending_requests", ["expires_at"],
                    unique=False, if_not_exists=True)
    op.create_table("oauth_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        if_not_exists=True,
    )
    op.create_table("oauth_signing_keys",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("alg", sa.String(length=16), nullable=False),
        sa.Column("public_jwk", sa.Text(), nullable=False),
        sa.Column("private_enc", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("retired_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("kid"),
        if_not_exists=True,
    )
    op.create_table("tenants",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("mfa_policy", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        if_not_exists=True,
    )
    op.create_table("oauth_issued_tokens",
        sa.Column("jti", sa.String(length=128), nullable=False),
        sa.Column("authorization_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["authorization_id"], ["oauth_authorizations.id"], ),
        sa.PrimaryKeyConstraint("jti"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_issued_tokens_authorization_id"), "oauth_issued_tokens", ["authorization_id"],
                    unique=False, if_not_exists=True)
    op.create_table("oauth_refresh_tokens",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("authorization_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("spent_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["authorization_id"], ["oauth_authorizations.id"], ),
        sa.PrimaryKeyConstraint("token_hash"),
        if_not_exists=True,
    )
    op.create_index(op.f("ix_oauth_refresh_tokens_authorization_id"), "oauth_refresh_tokens", ["authorization_id"],
                    unique=False, if_not_exists=True)


def downgrade() -> None:
    op.drop_table("oauth_refresh_tokens")
    op.drop_table("oauth_issued_tokens")
    op.drop_table("tenants")
    op.drop_table("oauth_signing_keys")
    op.drop_table("oauth_revision")
    op.drop_table("oauth_pending_requests")
    op.drop_table("oauth_consents")
    op.drop_table("oauth_codes")
    op.drop_table("oauth_clients")
    op.drop_table("oauth_authorizations")
    op.drop_table("oauth_assertion_jtis")
    op.drop_table("identity_webauthn_challenges")
    op.drop_table("identity_users")
    op.drop_table("identity_throttle")
    op.drop_table("identity_sessions")
    op.drop_table("identity_recovery_codes")
    op.drop_table("identity_passkeys")
    op.drop_table("identity_login_flows")
