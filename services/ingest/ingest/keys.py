"""API keys: create (secret shown once), look up by hash with a short cache, revoke, bootstrap."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.auth import SCOPES, generate_key, hash_key
from crm_common.db import create_engine, create_sessionmaker, session_scope
from ingest.models import ApiKey
from ingest.repository import KeyRepository
from ingest.schemas import ApiKeyCreate

BOOTSTRAP_KEY_NAME = "bootstrap"
_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind an API key."""

    key_id: uuid.UUID
    name: str
    source: str
    scopes: frozenset[str]
    rate_limit_per_s: float | None


def principal_of(key: ApiKey) -> Principal:
    return Principal(key.id, key.name, key.source, frozenset(key.scopes), key.rate_limit_per_s)


class KeyCache:
    """Remember looked-up keys for `ttl_s`, so the hot path does not read api_keys per request.

    Unknown keys are never cached: random guesses must not fill memory.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._entries[key_hash]
            return None
        return entry[0]

    def put(self, key_hash: str, principal: Principal) -> None:
        if len(self._entries) >= _CACHE_MAX:
            self._entries.clear()
        self._entries[key_hash] = (principal, time.monotonic() + self.ttl_s)

    def forget(self, key_id: uuid.UUID) -> None:
        for h in [h for h, (p, _) in self._entries.items() if p.key_id == key_id]:
            del self._entries[h]


async def authenticate(*, session: AsyncSession, cache: KeyCache, token: str) -> Principal | None:
    """Return the principal of a presented key, or None when it is unknown or revoked."""
    key_hash = hash_key(token)
    principal = cache.get(key_hash)
    if principal is not None:
        return principal
    key = await KeyRepository(session).by_hash(key_hash)
    if key is None:
        return None
    principal = principal_of(key)
    cache.put(key_hash, principal)
    return principal


async def create_key(*, session: AsyncSession, key_in: ApiKeyCreate) -> tuple[ApiKey, str]:
    """Create a key; return the row and the secret, which is never stored."""
    secret = generate_key()
    key = ApiKey(
        id=uuid.uuid4(),
        name=key_in.name,
        key_hash=hash_key(secret),
        source=key_in.source,
        scopes=sorted(set(key_in.scopes)),
        rate_limit_per_s=key_in.rate_limit_per_s,
    )
    await KeyRepository(session).add(key)
    return key, secret


async def revoke_key(*, session: AsyncSession, cache: KeyCache, key_id: uuid.UUID, now: datetime) -> ApiKey | None:
    """Revoke a key; this replica stops accepting it at once."""
    key = await KeyRepository(session).revoke(key_id, now=now)
    cache.forget(key_id)
    return key


async def add_known_key(
    *, session: AsyncSession, key: str, name: str, source: str, scopes: list[str], rate_limit_per_s: float | None = None
) -> None:
    """Register a caller-chosen secret (bootstrap, tests, benchmarks); keeps an existing one."""
    await KeyRepository(session).add_if_absent(
        ApiKey(
            id=uuid.uuid4(),
            name=name,
            key_hash=hash_key(key),
            source=source,
            scopes=scopes,
            rate_limit_per_s=rate_limit_per_s,
        )
    )


async def ensure_key(
    database_url: str,
    key: str,
    *,
    name: str,
    scopes: list[str],
    source: str = "pos",
    rate_limit_per_s: float | None = None,
) -> None:
    """Create a caller-chosen key in the database at `database_url` unless it exists; idempotent (the
    bootstrap key, a benchmark's or the chaos run's)."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with session_scope(create_sessionmaker(engine)) as session:
            await add_known_key(
                session=session, key=key, name=name, source=source, scopes=scopes, rate_limit_per_s=rate_limit_per_s
            )
    finally:
        await engine.dispose()


async def ensure_bootstrap_key(database_url: str, key: str) -> None:
    """Create the bootstrap key (source pos, all scopes) unless it exists; idempotent."""
    await ensure_key(database_url, key, name=BOOTSTRAP_KEY_NAME, scopes=list(SCOPES))
