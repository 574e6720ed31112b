"""Plain factories for event bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def purchase(
    event_id: str, *, customer_id: str = "c1", occurred_at: datetime, items: int = 3, **extra: Any
) -> dict[str, Any]:
    lines = [
        {"sku": f"sku-{i}", "name": f"Item {i}", "category": "grocery", "quantity": 1, "unit_price": "4.50"}
        for i in range(items)
    ]
    return {
        "event_id": event_id,
        "type": "purchase",
        "customer_id": customer_id,
        "occurred_at": occurred_at.isoformat(),
        "store_id": "store-1",
        "properties": {"order_id": f"o-{event_id}", "items": lines, "total": f"{4.5 * items:.2f}", "currency": "EUR"},
        **extra,
    }


def custom(event_id: str, *, occurred_at: datetime, customer_id: str = "c1", **props: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "type": "custom",
        "customer_id": customer_id,
        "occurred_at": occurred_at.isoformat(),
        "properties": {"name": "wishlist_added", **props},
    }
