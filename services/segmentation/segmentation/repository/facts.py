"""Facts in: purchases, items, refunds, traits, identities and deliveries, each stored once by its natural key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Text, any_, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from crm_common.contract.messages import DeliveryEvent
from crm_common.db import driver_connection
from segmentation import models


@dataclass(slots=True, kw_only=True)
class PurchaseFact:
    customer_id: str
    order_id: str
    message_id: str
    occurred_at: datetime
    local_date: date
    local_dow: int
    local_hour: int
    total: Decimal
    gross: Decimal
    discount: Decimal
    cost: Decimal | None
    discounted: bool
    items: list[dict[str, Any]]


@dataclass(slots=True, kw_only=True)
class TraitFact:
    customer_id: str
    field: str
    value_json: str
    occurred_at: datetime
    message_id: str


@dataclass(slots=True, kw_only=True)
class IdentityLink:
    """An anonymous visitor known to be this customer from `occurred_at` on."""

    anonymous_id: str
    customer_id: str
    occurred_at: datetime


@dataclass(slots=True, kw_only=True)
class RefundFact:
    customer_id: str
    refund_id: str
    order_id: str
    amount: Decimal
    occurred_at: datetime
    items: list[dict[str, str]] | None


# COPY takes positional records, the one place rows are built by position: the comprehension in
# upsert_purchases lists these columns in this order (a dict per line costs a few percent of the
# consumer's time), and tests/test_facts.py pins them to the table and reads every one back by name.
ITEM_COLUMNS = (
    "customer_id",
    "order_id",
    "line",
    "sku",
    "name",
    "category",
    "size",
    "color",
    "quantity",
    "amount",
    "occurred_at",
    "local_date",
    "local_dow",
)
DELIVERY_COLUMNS = set(models.DeliveryFact.__table__.columns.keys())
TEXT_ARRAY = ARRAY(Text)


class FactRepository:
    """Store facts once by their natural key; later/earlier duplicates resolve deterministically."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def upsert_traits(self, facts: Sequence[TraitFact], *, first_wins: bool = False) -> None:
        """Last writer by event time wins a field (or the first, for first-touch facts)."""
        if not facts:
            return
        cmp = "<" if first_wins else ">"
        await self.session.execute(
            text(
                "INSERT INTO trait_facts (customer_id, field, value, occurred_at, message_id) "
                "SELECT c, f, CAST(v AS jsonb), t, m FROM unnest(CAST(:c AS text[]), CAST(:f AS text[]), "
                "CAST(:v AS text[]), CAST(:t AS timestamptz[]), CAST(:m AS text[])) AS u(c, f, v, t, m) "
                "ON CONFLICT (customer_id, field) DO UPDATE SET value = excluded.value, "
                "occurred_at = excluded.occurred_at, message_id = excluded.message_id "
                f"WHERE (excluded.occurred_at, excluded.message_id) {cmp} (trait_facts.occurred_at, trait_facts.message_id)"
            ),
            {
                "c": [f.customer_id for f in facts],
                "f": [f.field for f in facts],
                "v": [f.value_json for f in facts],
                "t": [f.occurred_at for f in facts],
                "m": [f.message_id for f in facts],
            },
        )

    async def upsert_identities(self, links: Sequence[IdentityLink]) -> None:
        """The latest link of an anonymous id wins."""
        if not links:
            return
        await self.session.execute(
            text(
                "INSERT INTO identities (anonymous_id, customer_id, occurred_at) "
                "SELECT a, c, t FROM unnest(CAST(:a AS text[]), CAST(:c AS text[]), CAST(:t AS timestamptz[])) AS u(a, c, t) "
                "ON CONFLICT (anonymous_id) DO UPDATE SET customer_id = excluded.customer_id, occurred_at = excluded.occurred_at "
                "WHERE excluded.occurred_at > identities.occurred_at"
            ),
            {
                "a": [link.anonymous_id for link in links],
                "c": [link.customer_id for link in links],
                "t": [link.occurred_at for link in links],
            },
        )

    async def resolve_anonymous(self, anonymous_ids: Sequence[str]) -> dict[str, str]:
        """The customer each known anonymous id is linked to."""
        if not anonymous_ids:
            return {}
        identities = models.Identity_
        rows = await self.session.execute(
            select(identities.anonymous_id, identities.customer_id).where(
                identities.anonymous_id == any_(bindparam("a", type_=TEXT_ARRAY))
            ),
            {"a": list(anonymous_ids)},
        )
        return {r.anonymous_id: r.customer_id for r in rows}

    async def upsert_purchases(self, facts: Sequence[PurchaseFact]) -> None:
        """Store purchases by (customer, order); of two events for one order the smaller message id wins."""
        if not facts:
            return
        # Looked up by exact key pairs, so the primary key is used however stale the statistics are.
        existing = await self.session.execute(
            text(
                "SELECT p.customer_id, p.order_id, p.message_id "
                "FROM unnest(CAST(:c AS text[]), CAST(:o AS text[])) AS k(c, o) "
                "JOIN purchases p ON p.customer_id = k.c AND p.order_id = k.o"
            ),
            {"c": [f.customer_id for f in facts], "o": [f.order_id for f in facts]},
        )
        have = {(r.customer_id, r.order_id): r.message_id for r in existing}
        winners = [
            f
            for f in facts
            if (f.customer_id, f.order_id) not in have or f.message_id < have[(f.customer_id, f.order_id)]
        ]
        if not winners:
            return
        replaced = [f for f in winners if (f.customer_id, f.order_id) in have]
        if replaced:
            await self.session.execute(
                text(
                    "DELETE FROM purchase_items i USING unnest(CAST(:c AS text[]), CAST(:o AS text[])) AS k(c, o) "
                    "WHERE i.customer_id = k.c AND i.order_id = k.o"
                ),
                {"c": [f.customer_id for f in replaced], "o": [f.order_id for f in replaced]},
            )
        # One JSON document per statement: far cheaper to encode than a dozen typed arrays.
        orders = [
            {
                "c": f.customer_id,
                "o": f.order_id,
                "m": f.message_id,
                "t": f.occurred_at,
                "d": f.local_date,
                "dow": f.local_dow,
                "h": f.local_hour,
                "total": f.total,
                "gross": f.gross,
                "disc": f.discount,
                "cost": f.cost,
                "dd": f.discounted,
            }
            for f in winners
        ]
        await self.session.execute(
            text(
                "INSERT INTO purchases (customer_id, order_id, message_id, occurred_at, local_date, local_dow, local_hour, "
                "total, gross, discount, cost, discounted) "
                "SELECT c, o, m, t, d, dow, h, total, gross, disc, cost, dd FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x("
                "c text, o text, m text, t timestamptz, d date, dow smallint, h smallint, total numeric, gross numeric, "
                "disc numeric, cost numeric, dd boolean) "
                "ON CONFLICT (customer_id, order_id) DO UPDATE SET message_id = excluded.message_id, "
                "occurred_at = excluded.occurred_at, local_date = excluded.local_date, local_dow = excluded.local_dow, "
                "local_hour = excluded.local_hour, total = excluded.total, gross = excluded.gross, "
                "discount = excluded.discount, cost = excluded.cost, discounted = excluded.discounted, refunded_amount = 0"
            ),
            {"rows": serde.dumps(orders).decode()},
        )
        items = [
            (
                f.customer_id,
                f.order_id,
                n,
                it["sku"],
                it.get("name"),
                it.get("category"),
                it.get("size"),
                it.get("color"),
                it["quantity"],
                it["amount"],
                f.occurred_at,
                f.local_date,
                f.local_dow,
            )
            for f in winners
            for n, it in enumerate(f.items)
        ]
        if items:
            await self._copy(models.PurchaseItem.__tablename__, ITEM_COLUMNS, items)

    async def _copy(self, table: str, columns: Sequence[str], records: list[tuple[Any, ...]]) -> None:
        """Bulk insert through COPY on the session's connection (in its transaction): the
        cheapest way in for plain inserts of many rows, with nothing to parse on the server."""
        raw = await driver_connection(self.session)
        await raw.copy_records_to_table(table, records=records, columns=columns)

    async def insert_refunds(self, facts: Sequence[RefundFact]) -> None:
        """Refunds, once per (customer, refund id)."""
        await self._insert_new(models.Refund, [asdict(f) for f in facts])

    async def _insert_new(self, model: type[models.Base], rows: list[dict[str, Any]]) -> None:
        """Insert rows keyed by column name; a row whose key is stored already is left as it is."""
        if rows:
            await self.session.execute(insert(model).on_conflict_do_nothing(), rows)

    async def customers_with_refunds(self, customer_ids: Sequence[str]) -> list[str]:
        """Those of these customers who have any refund fact."""
        refunds = models.Refund
        rows = await self.session.execute(
            select(refunds.customer_id)
            .distinct()
            .where(refunds.customer_id == any_(bindparam("ids", type_=TEXT_ARRAY))),
            {"ids": list(customer_ids)},
        )
        return list(rows.scalars())

    async def apply_refunds(self, customer_ids: Sequence[str]) -> None:
        """Recompute refunded amounts per order and refunded quantities per item line from refund facts."""
        ids = {"ids": list(customer_ids)}
        await self.session.execute(
            text(
                "UPDATE purchases p SET refunded_amount = x.amt FROM ("
                "  SELECT p2.customer_id, p2.order_id, coalesce(sum(r.amount), 0) AS amt FROM purchases p2 "
                "  LEFT JOIN refunds r ON r.customer_id = p2.customer_id AND r.order_id = p2.order_id "
                "  WHERE p2.customer_id = ANY(CAST(:ids AS text[])) GROUP BY 1, 2) x "
                "WHERE p.customer_id = x.customer_id AND p.order_id = x.order_id AND p.refunded_amount <> x.amt"
            ),
            ids,
        )
        await self.session.execute(
            text(
                "UPDATE purchase_items i SET refunded_qty = x.rq FROM ("
                "  SELECT i2.customer_id, i2.order_id, i2.line, CASE"
                "    WHEN p.total > 0 AND p.refunded_amount >= p.total THEN i2.quantity"
                "    ELSE least(i2.quantity, greatest(0, coalesce(rs.qty, 0) - coalesce(sum(i2.quantity) OVER ("
                "      PARTITION BY i2.customer_id, i2.order_id, i2.sku ORDER BY i2.line"
                "      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))) END AS rq"
                "  FROM purchase_items i2 JOIN purchases p ON p.customer_id = i2.customer_id AND p.order_id = i2.order_id"
                "  LEFT JOIN (SELECT r.customer_id, r.order_id, it ->> 'sku' AS sku, sum((it ->> 'quantity')::numeric) AS qty"
                "    FROM refunds r CROSS JOIN LATERAL jsonb_array_elements(coalesce(r.items, '[]'::jsonb)) it"
                "    WHERE r.customer_id = ANY(CAST(:ids AS text[])) GROUP BY 1, 2, 3) rs"
                "    ON rs.customer_id = i2.customer_id AND rs.order_id = i2.order_id AND rs.sku = i2.sku"
                "  WHERE i2.customer_id = ANY(CAST(:ids AS text[]))) x "
                "WHERE i.customer_id = x.customer_id AND i.order_id = x.order_id AND i.line = x.line AND i.refunded_qty <> x.rq"
            ),
            ids,
        )

    async def insert_deliveries(self, facts: Sequence[DeliveryEvent]) -> None:
        """Delivery outcomes, once per (message, status)."""
        await self._insert_new(models.DeliveryFact, [f.model_dump(include=DELIVERY_COLUMNS) for f in facts])
