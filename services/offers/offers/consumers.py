"""Topic handlers: message in, domain call, nothing clever (the runtime commits and dedupes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.consumer import PoisonMessage, Record
from crm_common.contract.events import EventMessage
from crm_common.contract.messages import DeliveryEvent, LoyaltyEvent, SegmentMembershipChanged
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


def _decimal(value: Any) -> Decimal | None:
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def campaign_points_row(e: LoyaltyEvent) -> dict[str, Any] | None:
    """The campaign_points row of a loyalty event that names a campaign (a points-multiplier bonus or its
    reversal); None for the others. Points: `data.campaign_points` (signed; a reversal's whole share even when
    part of it became a points debt), else the event's points. Value: `data.value`, else points x
    `data.point_value`, else NULL (no point value known)."""
    campaign_id = e.data.get("campaign_id")
    if not isinstance(campaign_id, str) or not campaign_id:
        return None
    points = _decimal(e.data.get("campaign_points")) if "campaign_points" in e.data else e.points
    if points is None:
        return None
    value = _decimal(e.data.get("value")) if "value" in e.data else None
    if value is None and "point_value" in e.data:
        pv = _decimal(e.data["point_value"])
        value = points * pv if pv is not None else None
    offer_id = e.data.get("offer_id")
    return {
        "event_id": e.id,
        "campaign_id": campaign_id,
        "offer_id": offer_id if isinstance(offer_id, str) else None,
        "customer_id": e.customer_id,
        "points": points,
        "value": value,
        "occurred_at": e.occurred_at,
    }


def loyalty_handler() -> Handler:
    """crm.loyalty.v1: bonus points booked for campaigns (their cost), and each customer's balance and tier."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        events: list[LoyaltyEvent] = _parse(LoyaltyEvent, records, "loyalty")
        points = [row for row in map(campaign_points_row, events) if row is not None]
        latest: dict[str, dict[str, Any]] = {}  # in partition order: the last event of a customer is the newest
        for e in events:
            tier = e.data.get("to") if e.type == "tier.changed" else None
            if e.balance is None and not isinstance(tier, str):
                continue
            row = latest.setdefault(e.customer_id, {"k": e.customer_id, "balance": None, "tier": None, "at": None})
            if e.balance is not None:
                row["balance"] = e.balance
            if isinstance(tier, str):
                row["tier"] = tier
            row["at"] = e.occurred_at
        repo = OffersRepository(session)
        await repo.record_campaign_points(points)
        await repo.upsert_loyalty(list(latest.values()))

    return handle
