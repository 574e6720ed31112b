"""API keys: random secrets shown once, stored as SHA-256 hashes, with a source and scopes."""

from __future__ import annotations

import hashlib
import secrets

SCOPES = ("events:write", "events:read", "replay", "keys:admin")


def generate_key() -> str:
    """A new high-entropy key; its hash is what gets stored."""
    return "crm_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys are 256-bit random, so a fast hash is enough; a slow KDF would only cost latency.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """Return the token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
