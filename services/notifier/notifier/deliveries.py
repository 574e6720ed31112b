"""Delivery events: recorded once per id and published on crm.deliveries.v1 via the outbox."""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import DeliveryEvent
from crm_common.outbox import enqueue_models
from crm_common.settings import TOPIC_DELIVERIES
from notifier.repository import NotifierRepository


def delivery_event(
    *,
    message: Any,
    status: str,
    at: datetime,
    reason: str | None = None,
    cost: Decimal | None = None,
    url: str | None = None,
    channel: str | None = None,
) -> DeliveryEvent:
    """Build the event for one status of a message; its id makes repeats (a second open) no-ops."""
    suffix = status
    if status == "clicked" and url:
        suffix = f"clicked:{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    return DeliveryEvent(
        id=f"{message.id}:{suffix}",
        customer_id=message.customer_id,
        occurred_at=at,
        message_id=message.id,
        status=status,  # type: ignore[arg-type]
        channel=channel or message.channel,
        campaign_id=message.campaign_id,
        offer_id=message.offer_id,
        reason=reason,
        cost=cost,
        url=url,
    )


async def emit(session: AsyncSession, events: list[DeliveryEvent]) -> int:
    """Record events and put the new ones in the outbox; return how many were new."""
    if not events:
        return 0
    unique: dict[str, DeliveryEvent] = {}
    for e in events:
        unique.setdefault(e.id, e)
    fresh = await NotifierRepository(session).add_events(
        [
            {
                "id": e.id,
                "message_id": e.message_id,
                "customer_id": e.customer_id,
                "status": e.status,
                "reason": e.reason,
                "url": e.url,
                "at": e.occurred_at,
            }
            for e in unique.values()
        ]
    )
    new = [e for e in unique.values() if e.id in fresh]
    await enqueue_models(session, TOPIC_DELIVERIES, new)
    return len(new)
