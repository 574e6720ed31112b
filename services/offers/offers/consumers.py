"""Topic handlers: message in, domain call, nothing clever (the runtime commits and dedupes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.consumer import PoisonMessage, Record
from crm_common.contract.events import EventMessage
from crm_common.contract.messages import DeliveryEvent, SegmentMembershipChanged
from offers import triggers
from offers.evaluation import CampaignCache
from offers.peers import Peers
from offers.repository import OffersRepository
from offers.settings import Settings

Handler = Callable[[AsyncSession, list[Record]], Awaitable[None]]

# Later delivery states never give way to earlier ones (a late `sent` after `delivered`).
DELIVERY_RANK = {"sent": 1, "failed": 1, "suppressed": 1, "expired": 1, "delivered": 2, "opened": 3, "clicked": 4}


def _parse(model: type[Any], records: list[Record], what: str) -> list[Any]:
    try:
        return [model.model_validate(r.value) for r in records]
    except ValidationError as exc:
        raise PoisonMessage(f"not a {what} message: {exc.errors()[:3]}") from exc


def events_handler(clock: Clock, settings: Settings, cache: CampaignCache, peers: Peers) -> Handler:
    """crm.events.v1: customer facts, abandonment timers, event triggers."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        events = _parse(EventMessage, records, "event")
        await triggers.on_events(
            session=session,
            events=events,
            campaigns=await cache.get(session),
            peers=peers,
            now=clock.now(),
            settings=settings,
        )

    return handle


def segments_handler(clock: Clock, settings: Settings, cache: CampaignCache, peers: Peers) -> Handler:
    """crm.segments.v1: profile digests, memberships, segment-entry triggers."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        messages = _parse(SegmentMembershipChanged, records, "segment")
        await triggers.on_segments(
            session=session,
            messages=messages,
            campaigns=await cache.get(session),
            peers=peers,
            now=clock.now(),
            settings=settings,
        )

    return handle


def deliveries_handler() -> Handler:
    """crm.deliveries.v1: the notifier's verdict joins the decision that requested the message."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        rows = []
        for d in _parse(DeliveryEvent, records, "delivery"):
            if d.status in DELIVERY_RANK and d.message_id.startswith("ofr-"):
                rows.append(
                    {
                        "m": d.message_id,
                        "status": d.status,
                        "reason": d.reason,
                        "channel": d.channel,
                        "cost": d.cost,
                        "at": d.occurred_at,
                        "rank": DELIVERY_RANK[d.status],
                    }
                )
        await OffersRepository(session).record_deliveries(rows)

    return handle
