"""Attribution: the purchases and refunds offers consumes from crm.events.v1, kept per order so the
campaign report (and the back-test) can count revenue inside each assignment's attribution window.

An order's revenue is its paid total (`total`: the lines less their discounts); refunds of the order
reduce it, whenever they arrive. A redelivered event, or an order posted again under another event
id, changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import EventMessage


def _amount(value: Any) -> Decimal | None:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() and amount >= 0 else None


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class AttributionRepository:
    """The SQL of purchases and refunds, over the caller's session (the caller's boundary commits)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert_purchases(self, rows: Sequence[dict[str, Any]], now: datetime) -> None:
        if rows:
            await self.session.execute(
                text(
                    "INSERT INTO purchases (event_id, customer_id, order_id, occurred_at, revenue, properties, "
                    "recorded_at) SELECT j.e, j.k, j.o, j.at, j.rev, j.props, :now "
                    "FROM json_to_recordset(CAST(:rows AS json)) AS j(e text, k text, o text, at timestamptz, "
                    "rev numeric, props jsonb) ON CONFLICT DO NOTHING"
                ),
                {"rows": _json(rows), "now": now},
            )

    async def insert_refunds(self, rows: Sequence[dict[str, Any]], now: datetime) -> None:
        if rows:
            await self.session.execute(
                text(
                    "INSERT INTO refunds (event_id, customer_id, order_id, occurred_at, amount, recorded_at) "
                    "SELECT j.e, j.k, j.o, j.at, j.amount, :now "
                    "FROM json_to_recordset(CAST(:rows AS json)) AS j(e text, k text, o text, at timestamptz, "
                    "amount numeric) ON CONFLICT DO NOTHING"
                ),
                {"rows": _json(rows), "now": now},
            )


async def record_purchases(session: AsyncSession, events: Sequence[EventMessage], now: datetime) -> int:
    """Keep the batch's purchases and refunds of known customers (anonymous ones cannot be attributed).

    The events were validated by ingest; one whose order id or amount is unusable is skipped here
    (it still counts for the rest of offers), never the batch.
    """
    purchases: dict[str, dict[str, Any]] = {}
    refunds: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.customer_id is None or e.type not in ("purchase", "refund"):
            continue
        p = e.properties
        order_id = p.get("order_id")
        if not isinstance(order_id, str) or not order_id:
            continue
        if e.type == "purchase":
            revenue = _amount(p.get("total"))
            if revenue is not None:
                purchases[e.id] = {
                    "e": e.id,
                    "k": e.customer_id,
                    "o": order_id,
                    "at": e.occurred_at,
                    "rev": revenue,
                    "props": p,
                }
        else:
            amount = _amount(p.get("amount"))
            if amount is not None:
                refunds[e.id] = {"e": e.id, "k": e.customer_id, "o": order_id, "at": e.occurred_at, "amount": amount}
    repo = AttributionRepository(session)
    await repo.insert_purchases(list(purchases.values()), now)
    await repo.insert_refunds(list(refunds.values()), now)
    return len(purchases) + len(refunds)
