"""Errors of the ingest service; each carries its HTTP status and is rendered by the common handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from crm_common.errors import CRMError, InvalidInput, PayloadTooLarge, RateLimited, Unavailable, is_transient


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


class ReplayOutOfReach(InvalidInput):
    """A replay's `from` is older than the archive keeps or the consumers' inboxes remember."""


@asynccontextmanager
async def database_guard(retry_after_s: int) -> AsyncIterator[None]:
    """Turn "the database cannot be reached" into 503 with Retry-After instead of a 500."""
    try:
        yield
    except CRMError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise DatabaseUnavailable(
                "the event store is unavailable; retry later",
                headers={"Retry-After": str(retry_after_s)},
            ) from exc
        raise
