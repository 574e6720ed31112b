"""Topic handlers: decode, call the domain, let the runtime commit with the inbox."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.consumer import Record
from segmentation.profiles import apply_deliveries, apply_events
from segmentation.settings import Settings

Handler = Callable[[AsyncSession, list[Record]], Awaitable[None]]


def events_handler(settings: Settings, clock: Clock) -> Handler:
    """crm.events.v1: facts in, touched profiles and their memberships recomputed."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        await apply_events(
            session=session,
            records=records,
            now=clock.now(),
            decay_days=settings.favourites_decay_days,
        )

    return handle


def deliveries_handler(settings: Settings, clock: Clock) -> Handler:
    """crm.deliveries.v1: engagement per channel."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        await apply_deliveries(
            session=session,
            records=records,
            now=clock.now(),
            decay_days=settings.favourites_decay_days,
        )

    return handle
