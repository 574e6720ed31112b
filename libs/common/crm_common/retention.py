"""Retention of the runtime's own rows: inbox message ids older than `inbox_retention_days` go.

The inbox only has to remember a message id for as long as that message can come again: a
redelivery after a rebalance comes within minutes, a replay of ingest's archive reaches back at
most `inbox_retention_days` (ingest refuses older ones). Kept forever, the inbox would grow by
every message every consumer ever applied.

Deletes run in batches, each in its own short transaction, so a sweep that finds millions of old
rows never holds their locks (or bloats one transaction) for long, and consumers writing new ids
meanwhile are not held up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from crm_common.settings import BaseServiceSettings

INBOX_SWEEP = "inbox_retention"

# Oldest first by the processed_at index; the primary key finds each row to delete.
_DELETE_INBOX_BATCH = text(
    """
    DELETE FROM inbox
    WHERE (consumer, message_id) IN (
        SELECT consumer, message_id FROM inbox WHERE processed_at < :before ORDER BY processed_at LIMIT :limit
    )
    """
)

BatchStep = Callable[[AsyncConnection, int], Awaitable[int]]


def _engine_of(session: AsyncSession) -> AsyncEngine:
    bind = session.bind
    if not isinstance(bind, AsyncEngine):
        raise TypeError("a retention sweep needs a session bound to an AsyncEngine")
    return bind


async def delete_in_batches(*, session: AsyncSession, step: BatchStep, batch_size: int) -> int:
    """Run `step` (one DELETE of at most `batch_size` rows) until it deletes fewer; return the total.

    Each batch commits on a connection of its own: `session` (the sweep's, holding its advisory
    lock) stays open for the whole sweep, so one replica sweeps at a time while each batch's locks
    last only as long as that batch.
    """
    engine = _engine_of(session)
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = await step(conn, batch_size)
        total += deleted
        if deleted < batch_size:
            return total


async def delete_old_inbox_rows(*, session: AsyncSession, before: datetime, batch_size: int) -> int:
    """Delete inbox rows processed before `before`, in batches; return how many."""

    async def step(conn: AsyncConnection, limit: int) -> int:
        result = await conn.execute(_DELETE_INBOX_BATCH, {"before": before, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    return await delete_in_batches(session=session, step=step, batch_size=batch_size)


def inbox_horizon(settings: BaseServiceSettings, now: datetime) -> datetime:
    """The oldest processing time the inbox still remembers."""
    return now - timedelta(days=settings.inbox_retention_days)


def inbox_sweep(settings: BaseServiceSettings) -> Callable[[AsyncSession, datetime], Awaitable[Any]]:
    """The periodic sweep of a service's inbox, as `ServiceRuntime.add_sweep` takes it."""

    async def sweep(session: AsyncSession, now: datetime) -> int:
        return await delete_old_inbox_rows(
            session=session, before=inbox_horizon(settings, now), batch_size=settings.retention_batch_size
        )

    return sweep
