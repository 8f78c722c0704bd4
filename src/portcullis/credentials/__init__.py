"""Credentials the gateway verifies: API keys now; JWT, DPoP, mTLS and RFC 9421 later."""
