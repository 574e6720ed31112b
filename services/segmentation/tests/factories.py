"""Plain factories for events as they appear on crm.events.v1."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from crm_common.consumer import Record

_seq = itertools.count()


def event(
    type_: str,
    customer_id: str | None,
    at: datetime,
    properties: dict[str, Any] | None = None,
    *,
    event_id: str | None = None,
    anonymous_id: str | None = None,
    source: str = "pos",
) -> dict[str, Any]:
    eid = event_id or f"e{next(_seq):07d}"
    return {
        "id": f"{source}:{eid}",
        "source": source,
        "event_id": eid,
        "type": type_,
        "customer_id": customer_id,
        "anonymous_id": anonymous_id,
        "occurred_at": at.isoformat(),
        "received_at": at.isoformat(),
        "properties": properties or {},
    }


def item(sku: str, category: str, price: str, qty: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "sku": sku,
        "name": extra.pop("name", sku.replace("-", " ").title()),
        "category": category,
        "quantity": str(qty),
        "unit_price": price,
        **extra,
    }


def purchase(
    customer_id: str,
    at: datetime,
    items: list[dict[str, Any]],
    *,
    order_id: str | None = None,
    total: str | None = None,
    **props: Any,
) -> dict[str, Any]:
    from decimal import Decimal

    if total is None:
        total = str(
            sum(Decimal(i["unit_price"]) * Decimal(i["quantity"]) - Decimal(i.get("discount", "0")) for i in items)
        )
    oid = order_id or f"o{next(_seq):07d}"
    return event(
        "purchase",
        customer_id,
        at,
        {"order_id": oid, "items": items, "total": total, "currency": "EUR", **props},
    )


def refund(
    customer_id: str,
    at: datetime,
    order_id: str,
    amount: str,
    items: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    props: dict[str, Any] = {"order_id": order_id, "amount": amount}
    if items is not None:
        props["items"] = items
    return event("refund", customer_id, at, props)


def records(events: list[dict[str, Any]]) -> list[Record]:
    return [
        Record(topic="crm.events.v1", partition=0, offset=i, key=e["customer_id"], id=e["id"], value=e)
        for i, e in enumerate(events)
    ]
