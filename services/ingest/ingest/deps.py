"""Dependencies of the ingest routes: the caller's key with a required scope, settings, state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.errors import Forbidden, Unauthorized
from crm_common.service import RuntimeDep, ServiceRuntime
from ingest.errors import TooManyRequests, database_guard
from ingest.keys import KeyCache, Principal, authenticate
from ingest.ratelimit import RateLimiter
from ingest.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings  # type: ignore[return-value]


async def get_key_cache(request: Request) -> KeyCache:
    return request.app.state.key_cache  # type: ignore[no-any-return]


async def get_rate_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
KeyCacheDep = Annotated[KeyCache, Depends(get_key_cache)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]


def rate_of(principal: Principal, settings: Settings) -> float:
    return principal.rate_limit_per_s or settings.default_rate_limit_per_s


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's key must exist, be live and carry `scope`; one token is checked."""

    async def _principal(
        credentials: BearerDep,
        runtime: RuntimeDep,
        settings: SettingsDep,
        cache: KeyCacheDep,
        limiter: RateLimiterDep,
    ) -> Principal:
        if credentials is None or not credentials.credentials.strip():
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
            )
        return await authorize(
            credentials.credentials.strip(), scope, runtime=runtime, settings=settings, cache=cache, limiter=limiter
        )

    return _principal


async def authorize(
    token: str,
    scope: str,
    *,
    runtime: ServiceRuntime,
    settings: Settings,
    cache: KeyCache,
    limiter: RateLimiter,
    challenge: str = "Bearer",
) -> Principal:
    """The principal of a presented key: it must exist, be live, carry `scope` and have rate left."""
    principal = await _lookup(runtime, settings, cache, token)
    if principal is None:
        raise Unauthorized("unknown or revoked API key", headers={"WWW-Authenticate": challenge})
    if scope not in principal.scopes:
        raise Forbidden(f"this API key lacks the '{scope}' scope", details={"scopes": sorted(principal.scopes)})
    wait = limiter.exhausted(principal.key_id, rate_of(principal, settings))
    if wait is not None:
        raise TooManyRequests("rate limit of this API key exceeded", headers={"Retry-After": str(wait)})
    return principal


async def _lookup(runtime: ServiceRuntime, settings: Settings, cache: KeyCache, token: str) -> Principal | None:
    # The session opens a connection only when the cache misses.
    async with database_guard(settings.unavailable_retry_after_s), runtime.sessionmaker() as session:
        return await authenticate(session=session, cache=cache, token=token)


EventsWriter = Annotated[Principal, Depends(require_scope("events:write"))]
EventsReader = Annotated[Principal, Depends(require_scope("events:read"))]
Replayer = Annotated[Principal, Depends(require_scope("replay"))]
KeysAdmin = Annotated[Principal, Depends(require_scope("keys:admin"))]


@asynccontextmanager
async def one_statement(runtime: ServiceRuntime) -> AsyncIterator[AsyncSession]:
    """A session for a block that runs a single statement, committed by the statement itself: two
    round trips fewer than `transaction` (BEGIN, COMMIT), which a request of 10 events feels."""
    settings: Settings = runtime.settings  # type: ignore[assignment]
    async with database_guard(settings.unavailable_retry_after_s), runtime.autocommit_sessionmaker() as session:
        yield session


@asynccontextmanager
async def transaction(runtime: ServiceRuntime) -> AsyncIterator[AsyncSession]:
    """A session committed when the block ends; database outages become 503 with Retry-After."""
    settings: Settings = runtime.settings  # type: ignore[assignment]
    async with database_guard(settings.unavailable_retry_after_s), runtime.sessionmaker() as session:
        yield session
        await session.commit()
