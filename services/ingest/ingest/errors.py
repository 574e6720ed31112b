"""Errors of the ingest service; each carries its HTTP status and is rendered by the common handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from crm_common.errors import CRMError, InvalidInput, PayloadTooLarge, RateLimited, Unavailable
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError


class MalformedBody(CRMError):
    status_code = 400
    code = "malformed_json"


class BodyTooLarge(PayloadTooLarge):
    """The request body or its event count is over the contract's limit."""


class TooManyRequests(RateLimited):
    """The key spent its rate budget; Retry-After says when enough is back."""


class DatabaseUnavailable(Unavailable):
    """The archive cannot be written or read, so nothing can be accepted right now."""


class InvalidEvent(InvalidInput):
    """A single posted event failed validation."""


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = getattr(exc, "orig", None)
        sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
        # Connection failures, refused logins, a database that is gone, shut down, full or closed
        # to connections: the store is unavailable, not the request at fault.
        return bool(sqlstate and (sqlstate[:2] in {"08", "28", "3D", "53", "57"} or sqlstate == "55000"))
    return isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError)


@asynccontextmanager
async def database_guard(retry_after_s: int) -> AsyncIterator[None]:
    """Turn "the database cannot be reached" into 503 with Retry-After instead of a 500."""
    try:
        yield
    except CRMError:
        raise
    except Exception as exc:
        if _is_unavailable(exc):
            raise DatabaseUnavailable(
                "the event store is unavailable; retry later",
                headers={"Retry-After": str(retry_after_s)},
            ) from exc
        raise
