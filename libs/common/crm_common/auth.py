"""API keys: random secrets shown once, stored as SHA-256 hashes, with a source and scopes.

Two uses: ingest keeps its keys in its database (with sources and scopes) for event sources;
every other service checks the ops keys configured in CRM_API_KEYS (`ApiKeys`, `api_key_dependency`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from crm_common.errors import Unauthorized

SCOPES = ("events:write", "events:read", "replay", "keys:admin")
DIGEST_PREFIX = "sha256:"
WWW_AUTHENTICATE = {"WWW-Authenticate": "Bearer"}


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


class ApiKeys:
    """The ops API keys of a service, kept as SHA-256 digests only.

    `spec` is CRM_API_KEYS: comma-separated entries, each a plaintext key or `sha256:<hex>` of one
    (so a deployment can keep only digests in its configuration).
    """

    def __init__(self, spec: str) -> None:
        digests = []
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            if entry.lower().startswith(DIGEST_PREFIX):
                hexdigest = entry[len(DIGEST_PREFIX) :].strip()
                try:
                    digest = bytes.fromhex(hexdigest)
                except ValueError:
                    digest = b""
                if len(digest) != hashlib.sha256().digest_size:
                    raise ValueError("CRM_API_KEYS: a sha256: entry must be 64 hex digits (the SHA-256 of the key)")
                digests.append(digest)
            else:
                digests.append(hashlib.sha256(entry.encode("utf-8", "surrogatepass")).digest())
        self._digests = tuple(digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, token: str) -> bool:
        """Whether `token` is one of the keys; every digest is compared, in constant time each."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, presented)
        return found


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="an ops API key, one of CRM_API_KEYS: `Authorization: Bearer <key>`",
)


def api_key_dependency(keys: ApiKeys) -> Callable[..., Awaitable[None]]:
    """A route dependency: the request must carry `Authorization: Bearer <one of keys>`."""

    async def _require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if not keys:
            raise Unauthorized(
                "no API keys are configured for this service: set CRM_API_KEYS "
                "(comma-separated keys, or sha256:<hex> digests of them)",
                headers=WWW_AUTHENTICATE,
            )
        token = credentials.credentials.strip() if credentials is not None else ""
        if not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", headers=WWW_AUTHENTICATE)
        if not keys.matches(token):
            raise Unauthorized("unknown API key", headers=WWW_AUTHENTICATE)

    return _require_api_key
