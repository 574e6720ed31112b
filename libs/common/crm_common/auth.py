"""API keys: random secrets shown once, stored as SHA-256 hashes, with a source and scopes.

Two uses: ingest keeps its keys in its database (with sources and scopes) for event sources;
every other service checks the ops keys configured in CRM_API_KEYS (`ApiKeys`, `api_key_dependency`),
each with its scopes (read, write, pii).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from crm_common.errors import Forbidden, Unauthorized, coded

MissingScope = coded(Forbidden, "missing_scope", "The API key lacks the scope the request needs.")

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


OPS_SCOPES = ("read", "write", "pii")
# Methods that change nothing: every other method needs the `write` scope.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _parse_scopes(entry: str, text: str) -> frozenset[str]:
    scopes = frozenset(s.strip().lower() for s in text.split("+"))
    unknown = sorted(scopes - set(OPS_SCOPES))
    if unknown or not scopes:
        raise ValueError(
            f"CRM_API_KEYS: entry {entry[:12]}...: unknown scope {', '.join(unknown) or '(empty)'}; "
            f"scopes are {'+'.join(OPS_SCOPES)}, joined with '+' after a ':' (key:read+pii)"
        )
    return scopes | {"read"}


def _digest_entry(entry: str) -> tuple[bytes, frozenset[str]]:
    """(SHA-256 digest, scopes) of one CRM_API_KEYS entry."""
    if entry.lower().startswith(DIGEST_PREFIX):
        hexdigest, sep, scope_text = entry[len(DIGEST_PREFIX) :].partition(":")
        try:
            digest = bytes.fromhex(hexdigest.strip())
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("CRM_API_KEYS: a sha256: entry must be 64 hex digits (the SHA-256 of the key)")
    else:
        key, sep, scope_text = entry.rpartition(":")
        key = key.strip() if sep else entry
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    scopes = _parse_scopes(entry, scope_text) if sep else frozenset(OPS_SCOPES)
    return digest, scopes


class ApiKeys:
    """The ops API keys of a service, kept as SHA-256 digests only, each with its scopes.

    `spec` is CRM_API_KEYS: comma-separated entries, each a plaintext key or `sha256:<hex>` of one
    (so a deployment can keep only digests in its configuration), optionally followed by
    `:<scopes>`, scopes joined with `+`: `read` (every key has it), `write` (any method but
    GET/HEAD), `pii` (e-mail addresses and phone numbers unmasked). An entry without scopes has
    all three, as before scopes existed: `k1,k2:read,k3:read+pii,sha256:<hex>:read+write`.
    """

    def __init__(self, spec: str) -> None:
        self._entries = tuple(_digest_entry(e) for e in (e.strip() for e in spec.split(",")) if e)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def scopes(self, token: str) -> frozenset[str] | None:
        """The scopes of `token`, None when it is no key; every digest is compared, in constant time each."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: frozenset[str] | None = None
        for digest, scopes in self._entries:
            if hmac.compare_digest(digest, presented):
                found = scopes
        return found

    def matches(self, token: str) -> bool:
        """Whether `token` is one of the keys."""
        return self.scopes(token) is not None


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="an ops API key, one of CRM_API_KEYS: `Authorization: Bearer <key>`; "
    "a key without the `write` scope may only GET, one without `pii` sees e-mail addresses and phone numbers masked",
)


# For a POST that only reads (a dry-run, a preview, a coupon check): `@router.post(..., **CHANGES_NOTHING)`.
# A key without `write` may call it; the OpenAPI shows the mark. tests/test_api_keys.py pins the list.
CHANGES_NOTHING: dict[str, Any] = {"openapi_extra": {"x-changes-nothing": True}}


def changes_nothing(request: Request) -> bool:
    route = request.scope.get("route")
    return bool((getattr(route, "openapi_extra", None) or {}).get("x-changes-nothing"))


def api_key_dependency(keys: ApiKeys) -> Callable[..., Awaitable[None]]:
    """A route dependency: the request must carry `Authorization: Bearer <one of keys>`, with the
    `write` scope unless it is a GET or HEAD; a key without `pii` has the answer masked
    (`crm_common.pii.PiiMaskMiddleware`, told through the request state)."""

    async def _require_api_key(
        request: Request,
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
        scopes = keys.scopes(token)
        if scopes is None:
            raise Unauthorized("unknown API key", headers=WWW_AUTHENTICATE)
        if request.method not in READ_METHODS and "write" not in scopes and not changes_nothing(request):
            raise MissingScope(
                f"this API key may not change anything: {request.method} needs the 'write' scope",
                details={"required_scope": "write", "scopes": sorted(scopes)},
            )
        if "pii" not in scopes:
            request.state.mask_pii = True

    return _require_api_key
