"""How far back ingest reaches: the archive's retention sweep, and the earliest `from` of a replay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from crm_common.contract.events import MAX_FUTURE
from crm_common.retention import delete_in_batches, inbox_horizon
from ingest.errors import ReplayOutOfReach
from ingest.repository import delete_archived_batch
from ingest.settings import Settings

ARCHIVE_SWEEP = "archive_retention"


def archive_horizon(settings: Settings, now: datetime) -> datetime:
    """The oldest received_at the archive still keeps."""
    return now - timedelta(days=settings.archive_retention_days)


def earliest_replay(*, settings: Settings, now: datetime, by: str) -> tuple[datetime, str]:
    """The earliest `from` a replay may ask for, and what sets it.

    Two limits: events the archive no longer has, and events whose first delivery the consumers'
    inboxes have forgotten (they would apply the replayed copy as a new event).
    """
    inbox = inbox_horizon(settings, now)
    archive = archive_horizon(settings, now)
    if archive >= inbox:
        earliest, reason = archive, f"the archive keeps events for {settings.archive_retention_days} days"
    else:
        earliest, reason = (
            inbox,
            f"the consumers' inboxes remember deliveries for {settings.inbox_retention_days} days, "
            "so older events would be applied twice",
        )
    if by == "occurred_at":
        # An event may be received up to MAX_FUTURE before the time it says it occurred.
        earliest += MAX_FUTURE
    return earliest, reason


def check_replay_reach(*, start: datetime, by: str, settings: Settings, now: datetime) -> None:
    """Refuse a replay whose `from` reaches past the archive or the inboxes' memory."""
    earliest, reason = earliest_replay(settings=settings, now=now, by=by)
    if start < earliest:
        msg = f"from reaches too far back: {reason}; the earliest allowed is {earliest.isoformat()}"
        raise ReplayOutOfReach(
            msg,
            details=[{"loc": ["body", "from"], "msg": msg, "type": "value_error", "earliest": earliest.isoformat()}],
        )


def archive_sweep(settings: Settings) -> Callable[[AsyncSession, datetime], Awaitable[int]]:
    """The periodic sweep deleting archived events past `archive_retention_days` once published."""

    async def sweep(session: AsyncSession, now: datetime) -> int:
        before = archive_horizon(settings, now)

        async def step(conn: AsyncConnection, limit: int) -> int:
            return await delete_archived_batch(conn, before=before, limit=limit)

        return await delete_in_batches(session=session, step=step, batch_size=settings.retention_batch_size)

    return sweep
