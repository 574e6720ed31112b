"""Plain factories for loyalty tests: event messages and programme rules."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from crm_common.contract.events import EventMessage
from crm_common.testing.helpers import event_message

SCENARIO4_PROGRAMME: dict[str, Any] = {
    "base_rate": "0.01",
    "tiers": [{"name": "top", "min_spend": "1000", "rate": "0.03"}],
    "expiry_days": 180,
    "reminder_days": 14,
    "max_redeem_share": "0.30",
    "point_value": "0.01",
    "goals": {"segment_keys": ["visits_dropped"], "purchases": 3, "days": 30, "reward": "300"},
}


def event(
    type_: str, customer_id: str, at: datetime, properties: dict[str, Any], *, event_id: str | None = None
) -> dict[str, Any]:
    """An event message as ingest publishes it on crm.events.v1."""
    return event_message(type_, customer_id, at, properties, event_id=event_id, source="pos")


def purchase(
    customer_id: str,
    order_id: str,
    total: Decimal | str,
    at: datetime,
    *,
    category: str = "grocery",
    redemption_id: str | None = None,
    points_redeemed: Decimal | str | None = None,
    items: list[dict[str, Any]] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    props: dict[str, Any] = {
        "order_id": order_id,
        "items": items or [{"sku": "sku-1", "category": category, "quantity": "1", "unit_price": str(total)}],
        "total": str(total),
        "currency": "EUR",
    }
    if redemption_id is not None:
        props["redemption_id"] = redemption_id
    if points_redeemed is not None:
        props["points_redeemed"] = str(points_redeemed)
    return event("purchase", customer_id, at, props, event_id=event_id)


def refund(customer_id: str, order_id: str, amount: Decimal | str, at: datetime, **kw: Any) -> dict[str, Any]:
    return event("refund", customer_id, at, {"order_id": order_id, "amount": str(amount)}, **kw)


def customer_updated(customer_id: str, at: datetime, **props: Any) -> dict[str, Any]:
    return event("customer_updated", customer_id, at, props)


def messages(*dicts: dict[str, Any]) -> list[EventMessage]:
    return [EventMessage.model_validate(d) for d in dicts]


def segment_entered(customer_id: str, segment_key: str, at: datetime, msg_id: str | None = None) -> dict[str, Any]:
    return {
        "id": msg_id or f"seg:{uuid.uuid4().hex}",
        "type": "segment.entered",
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "segment_id": f"seg-{segment_key}",
        "segment_key": segment_key,
        "profile": {},
    }


def offer_request(
    customer_id: str,
    msg_id: str,
    at: datetime,
    *,
    multiplier: str = "2",
    valid_until: str | None = None,
    campaign_id: str = "cmp-1",
    offer_kind: str = "points_multiplier",
) -> dict[str, Any]:
    """A MessageRequested as offers writes it for a campaign's offer (kind marketing)."""
    return {
        "id": msg_id,
        "type": "message.requested",
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "kind": "marketing",
        "template": "bonus_points",
        "variables": {
            "offer_kind": offer_kind,
            "multiplier": multiplier,
            "discount": f"x{multiplier} bonus points",
            "valid_until": valid_until if valid_until is not None else at.date().isoformat(),
        },
        "campaign_id": campaign_id,
        "offer_id": f"{campaign_id}:v1",
        "source_service": "offers",
    }
