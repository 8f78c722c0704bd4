"""The authorization server: OAuth 2.1 / OpenID Connect on the gateway's origin (issue 4).

Authlib does the protocol core (grants, client authentication, introspection,
revocation, metadata); the per-RFC modules here add what it lacks (DPoP at the token
endpoint, PAR, RFC 9207, refresh-reuse detection). `identity/` holds users, passwords,
MFA, sessions and the pages. It is mounted into the pipeline by `AuthServerStage`.
"""
