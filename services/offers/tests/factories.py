"""Plain factories for offers tests: campaign definitions, event and segment messages, templates."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from crm_common.testing.helpers import OFFER_VARIABLES, event_message


def campaign(name: str, trigger: dict[str, Any], template: str, **sections: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "trigger": trigger, "delivery": {"template": template}}
    body.update(sections)
    return body


def event(
    type_: str, customer_id: str, at: datetime, properties: dict[str, Any], *, event_id: str | None = None
) -> dict[str, Any]:
    """An event message as ingest publishes it on crm.events.v1."""
    return event_message(type_, customer_id, at, properties, event_id=event_id, source="site")


def purchase(customer_id: str, at: datetime, total: str = "20", **kw: Any) -> dict[str, Any]:
    return event(
        "purchase",
        customer_id,
        at,
        {
            "order_id": uuid.uuid4().hex[:12],
            "items": [{"sku": "s1", "category": "grocery", "unit_price": total}],
            "total": total,
            "currency": "EUR",
        },
        **kw,
    )


def segment_entered(
    customer_id: str,
    segment_key: str,
    at: datetime,
    profile: dict[str, Any] | None = None,
    *,
    exited: bool = False,
    msg_id: str | None = None,
) -> dict[str, Any]:
    """A SegmentMembershipChanged as segmentation publishes it on crm.segments.v1."""
    return {
        "id": msg_id or f"segchg:{uuid.uuid4().hex}",
        "type": "segment.exited" if exited else "segment.entered",
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "segment_id": f"seg-{segment_key}",
        "segment_key": segment_key,
        "profile": profile or {},
    }


def template(
    key: str,
    channel: str,
    body: str = "Hi {{ first_name }}: {{ discount }} on {{ product_name }}",
    subject: str | None = "An offer for you",
) -> dict[str, Any]:
    return {
        "key": key,
        "channel": channel,
        "locale": "en",
        "subject": subject if channel != "sms" else None,
        "body": body,
        "variables": OFFER_VARIABLES,
    }
