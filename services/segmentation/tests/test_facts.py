"""Facts land in the columns they are named for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from crm_common.db import session_scope
from segmentation.models import PurchaseItem
from segmentation.profiles import apply_events
from segmentation.repository.facts import ITEM_COLUMNS

from .conftest import fetch_all
from .factories import item, purchase, records

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)


def test_item_columns_are_the_table_columns_the_copy_fills():
    filled_by_default = {"refunded_qty"}
    assert set(ITEM_COLUMNS) == {c.name for c in PurchaseItem.__table__.columns} - filled_by_default
    assert len(ITEM_COLUMNS) == len(set(ITEM_COLUMNS))


async def test_purchase_items_are_stored_column_by_column(db):
    _, sm = db
    saturday_evening = datetime(2026, 2, 28, 19, 30, tzinfo=timezone(timedelta(hours=2)))
    lines = [
        item("shirt-1", "clothes", "20.00", qty=2, name="Linen shirt", size="M", color="blue", discount="4.00"),
        item("brie", "cheese", "7.50"),
    ]
    async with session_scope(sm) as s:
        await apply_events(
            session=s,
            records=records([purchase("ann", saturday_evening, lines, order_id="o1")]),
            now=NOW,
            decay_days=90,
        )
    stored = await fetch_all(sm, "SELECT * FROM purchase_items ORDER BY line")
    assert stored == [
        {
            "customer_id": "ann",
            "order_id": "o1",
            "line": 0,
            "sku": "shirt-1",
            "name": "Linen shirt",
            "category": "clothes",
            "size": "M",
            "color": "blue",
            "quantity": Decimal("2.0000"),
            "amount": Decimal("36.0000"),
            "refunded_qty": Decimal("0.0000"),
            "occurred_at": saturday_evening,
            "local_date": saturday_evening.date(),
            "local_dow": 6,
        },
        {
            "customer_id": "ann",
            "order_id": "o1",
            "line": 1,
            "sku": "brie",
            "name": "Brie",
            "category": "cheese",
            "size": None,
            "color": None,
            "quantity": Decimal("1.0000"),
            "amount": Decimal("7.5000"),
            "refunded_qty": Decimal("0.0000"),
            "occurred_at": saturday_evening,
            "local_date": saturday_evening.date(),
            "local_dow": 6,
        },
    ]
