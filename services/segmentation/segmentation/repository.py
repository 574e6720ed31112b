"""Every query of the segmentation service: facts in, profiles recomputed, memberships applied."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from crm_common.outbox import mark_outbox_written
from crm_common.settings import TOPIC_SEGMENTS


@dataclass(slots=True)
class PurchaseFact:
    customer_id: str
    order_id: str
    message_id: str
    occurred_at: datetime
    local_date: Any
    local_dow: int
    local_hour: int
    total: Decimal
    gross: Decimal
    discount: Decimal
    cost: Decimal | None
    discounted: bool
    items: list[dict[str, Any]]


@dataclass(slots=True)
class TraitFact:
    customer_id: str
    field: str
    value_json: str
    occurred_at: datetime
    message_id: str


@dataclass(slots=True)
class RefundFact:
    customer_id: str
    refund_id: str
    order_id: str
    amount: Decimal
    occurred_at: datetime
    items_json: str | None


@dataclass(slots=True)
class DeliveryFact:
    message_id: str
    status: str
    customer_id: str
    channel: str | None
    occurred_at: datetime


async def disable_jit(session: AsyncSession) -> None:
    """Rule statements look expensive to the planner (many subplans) but run fast; JIT compiling
    them costs seconds per statement, so it is off for this transaction."""
    await session.execute(text("SET LOCAL jit = off"))


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

    async def upsert_identities(self, pairs: Sequence[tuple[str, str, datetime]]) -> None:
        if not pairs:
            return
        await self.session.execute(
            text(
                "INSERT INTO identities (anonymous_id, customer_id, occurred_at) "
                "SELECT * FROM unnest(CAST(:a AS text[]), CAST(:c AS text[]), CAST(:t AS timestamptz[])) "
                "ON CONFLICT (anonymous_id) DO UPDATE SET customer_id = excluded.customer_id, occurred_at = excluded.occurred_at "
                "WHERE excluded.occurred_at > identities.occurred_at"
            ),
            {"a": [p[0] for p in pairs], "c": [p[1] for p in pairs], "t": [p[2] for p in pairs]},
        )

    async def resolve_anonymous(self, anonymous_ids: Sequence[str]) -> dict[str, str]:
        if not anonymous_ids:
            return {}
        rows = await self.session.execute(
            text("SELECT anonymous_id, customer_id FROM identities WHERE anonymous_id = ANY(CAST(:a AS text[]))"),
            {"a": list(anonymous_ids)},
        )
        return {r[0]: r[1] for r in rows}

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
        have = {(r[0], r[1]): r[2] for r in existing}
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
            await self._copy("purchase_items", ITEM_COLUMNS, items)

    async def _copy(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Bulk insert through COPY on the session's connection (in its transaction): the
        cheapest way in for plain inserts of many rows, with nothing to parse on the server."""
        connection = await self.session.connection()
        raw = await connection.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(table, records=rows, columns=columns)  # type: ignore[union-attr]

    async def insert_refunds(self, facts: Sequence[RefundFact]) -> None:
        if not facts:
            return
        await self.session.execute(
            text(
                "INSERT INTO refunds (customer_id, refund_id, order_id, amount, occurred_at, items) "
                "SELECT c, r, o, a, t, CAST(i AS jsonb) FROM unnest(CAST(:c AS text[]), CAST(:r AS text[]), "
                "CAST(:o AS text[]), CAST(:a AS numeric[]), CAST(:t AS timestamptz[]), CAST(:i AS text[])) AS u(c, r, o, a, t, i) "
                "ON CONFLICT DO NOTHING"
            ),
            {
                "c": [f.customer_id for f in facts],
                "r": [f.refund_id for f in facts],
                "o": [f.order_id for f in facts],
                "a": [f.amount for f in facts],
                "t": [f.occurred_at for f in facts],
                "i": [f.items_json for f in facts],
            },
        )

    async def customers_with_refunds(self, customer_ids: Sequence[str]) -> list[str]:
        rows = await self.session.execute(
            text("SELECT DISTINCT customer_id FROM refunds WHERE customer_id = ANY(CAST(:ids AS text[]))"),
            {"ids": list(customer_ids)},
        )
        return [r[0] for r in rows]

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

    async def insert_deliveries(self, facts: Sequence[DeliveryFact]) -> None:
        if not facts:
            return
        await self.session.execute(
            text(
                "INSERT INTO delivery_facts (message_id, status, customer_id, channel, occurred_at) "
                "SELECT * FROM unnest(CAST(:m AS text[]), CAST(:s AS text[]), CAST(:c AS text[]), CAST(:ch AS text[]), "
                "CAST(:t AS timestamptz[])) ON CONFLICT DO NOTHING"
            ),
            {
                "m": [f.message_id for f in facts],
                "s": [f.status for f in facts],
                "c": [f.customer_id for f in facts],
                "ch": [f.channel for f in facts],
                "t": [f.occurred_at for f in facts],
            },
        )


# One set-based statement recomputes every feature of the given customers from their facts. Each
# fact table is filtered by `= ANY(:ids)` itself (not only joined to `ids`), so that its index is
# used even when the planner's statistics lag behind a table that grew since the last ANALYZE.
RECOMPUTE_SQL = """
WITH ids AS (SELECT DISTINCT unnest(CAST(:ids AS text[])) AS customer_id),
po AS (
    SELECT p.customer_id, p.order_id, p.occurred_at, p.local_dow, p.local_hour, p.total, p.gross, p.discount,
           p.cost, p.discounted,
           p.total - least(p.total, p.refunded_amount) AS net,
           CASE WHEN p.total > 0 THEN (p.total - least(p.total, p.refunded_amount)) / p.total ELSE 1 END AS frac
    FROM purchases p
    WHERE p.customer_id = ANY(CAST(:ids AS text[])) AND NOT (p.total > 0 AND p.refunded_amount >= p.total)
),
agg AS (
    SELECT customer_id, count(*)::int AS orders, sum(net) AS revenue,
           sum((total - coalesce(cost, 0)) * frac) AS margin,
           min(occurred_at) AS first_at, max(occurred_at) AS last_at,
           (sum(discount) / nullif(sum(gross), 0))::float8 AS discount_share,
           (count(*) FILTER (WHERE discounted))::float8 / count(*) AS discounted_share,
           ARRAY[count(*) FILTER (WHERE local_dow = 1), count(*) FILTER (WHERE local_dow = 2),
                 count(*) FILTER (WHERE local_dow = 3), count(*) FILTER (WHERE local_dow = 4),
                 count(*) FILTER (WHERE local_dow = 5), count(*) FILTER (WHERE local_dow = 6),
                 count(*) FILTER (WHERE local_dow = 7)]::int[] AS dow_counts,
           mode() WITHIN GROUP (ORDER BY local_dow) AS fav_dow,
           mode() WITHIN GROUP (ORDER BY local_hour) AS fav_hour
    FROM po GROUP BY customer_id
),
days AS (SELECT DISTINCT customer_id, (occurred_at AT TIME ZONE 'UTC')::date AS d FROM po),
gaps AS (SELECT customer_id, d - lag(d) OVER (PARTITION BY customer_id ORDER BY d) AS gap FROM days),
cad AS (
    SELECT customer_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) AS cadence
    FROM gaps WHERE gap IS NOT NULL GROUP BY customer_id
),
it AS (
    SELECT i.customer_id, i.sku, i.name, i.category, i.size, i.color,
           (i.quantity - i.refunded_qty)
             * exp(-extract(epoch FROM a.last_at - i.occurred_at) / 86400.0 / CAST(:decay AS float8)) AS w
    FROM purchase_items i JOIN agg a USING (customer_id)
    -- lines of fully refunded orders have refunded_qty = quantity (apply_refunds)
    WHERE i.customer_id = ANY(CAST(:ids AS text[])) AND i.quantity > i.refunded_qty
),
cats AS (
    SELECT customer_id, category, row_number() OVER (PARTITION BY customer_id ORDER BY round(sum(w)::numeric, 6) DESC, category) AS rn
    FROM it WHERE category IS NOT NULL GROUP BY customer_id, category
),
cat_top AS (
    SELECT customer_id, jsonb_agg(category ORDER BY rn) FILTER (WHERE rn <= 5) AS top,
           min(category) FILTER (WHERE rn = 1) AS fav
    FROM cats GROUP BY customer_id
),
skus AS (
    SELECT customer_id, sku, round(sum(w)::numeric, 6) AS score, max(name) AS name, max(category) AS category
    FROM it GROUP BY customer_id, sku
),
best_sku AS (
    SELECT DISTINCT ON (customer_id) customer_id, sku, name, category FROM skus ORDER BY customer_id, score DESC, sku
),
-- size and colour are aggregated for the favourite product only, not for every product bought
sku_top AS (
    SELECT b.customer_id, jsonb_strip_nulls(jsonb_build_object('sku', b.sku, 'name', b.name, 'category', b.category,
           'size', mode() WITHIN GROUP (ORDER BY it.size), 'color', mode() WITHIN GROUP (ORDER BY it.color))) AS fav
    FROM best_sku b JOIN it ON it.customer_id = b.customer_id AND it.sku = b.sku
    GROUP BY b.customer_id, b.sku, b.name, b.category
),
sizes AS (
    SELECT DISTINCT ON (customer_id) customer_id, size FROM (
        SELECT customer_id, size, round(sum(w)::numeric, 6) AS s FROM it WHERE size IS NOT NULL GROUP BY 1, 2) x
    ORDER BY customer_id, s DESC, size
),
colors AS (
    SELECT DISTINCT ON (customer_id) customer_id, color FROM (
        SELECT customer_id, color, round(sum(w)::numeric, 6) AS s FROM it WHERE color IS NOT NULL GROUP BY 1, 2) x
    ORDER BY customer_id, s DESC, color
),
tr AS (
    SELECT customer_id,
           jsonb_strip_nulls(coalesce(jsonb_object_agg(field, value) FILTER (
               WHERE field NOT LIKE 'consents.%' AND left(field, 1) <> '_'), '{}'::jsonb)) AS traits,
           jsonb_strip_nulls(coalesce(jsonb_object_agg(substr(field, 10), value) FILTER (
               WHERE field LIKE 'consents.%'), '{}'::jsonb)) AS consents,
           max(value ->> 0) FILTER (WHERE field = '_first_touch') AS first_touch,
           max((value ->> 'rating')::int) FILTER (WHERE field = '_feedback') AS fb_rating,
           max(value ->> 'topic') FILTER (WHERE field = '_feedback') AS fb_topic,
           max(occurred_at) FILTER (WHERE field = '_feedback') AS fb_at
    FROM trait_facts WHERE customer_id = ANY(CAST(:ids AS text[])) GROUP BY customer_id
),
eng AS (
    SELECT customer_id, jsonb_object_agg(channel, counts) AS engagement FROM (
        SELECT customer_id, channel, jsonb_object_agg(status, n) AS counts FROM (
            SELECT customer_id, coalesce(channel, 'unknown') AS channel, status, count(*) AS n
            FROM delivery_facts WHERE customer_id = ANY(CAST(:ids AS text[])) GROUP BY 1, 2, 3) a
        GROUP BY 1, 2) b
    GROUP BY customer_id
),
st AS (
    SELECT (SELECT value FROM feature_stats WHERE key = 'rfm') AS rfm,
           (SELECT (value ->> 'core_margin')::float8 FROM feature_stats WHERE key = 'value_tiers') AS core_margin
),
calc AS (
    SELECT ids.customer_id, coalesce(tr.traits, '{}'::jsonb) AS traits, coalesce(tr.consents, '{}'::jsonb) AS consents,
           coalesce(tr.traits ->> 'acquisition_channel', tr.first_touch) AS acquisition_channel,
           a.first_at, a.last_at, coalesce(a.orders, 0) AS orders, coalesce(a.revenue, 0) AS revenue,
           coalesce(a.margin, 0) AS margin, round(a.revenue / nullif(a.orders, 0), 4) AS avg_check,
           a.discount_share, a.discounted_share,
           CASE WHEN a.orders IS NULL THEN NULL
                WHEN a.orders >= 3 AND a.discounted_share >= 0.8 THEN 'deal_hunter'
                WHEN a.orders >= 2 AND a.discounted_share >= 0.5 THEN 'discount_lover'
                ELSE 'none' END AS discount_affinity,
           coalesce(ct.top, '[]'::jsonb) AS top_categories, ct.fav AS favourite_category, sk.fav AS favourite_product,
           sz.size AS favourite_size, co.color AS favourite_color,
           coalesce(a.dow_counts, '{0,0,0,0,0,0,0}'::int[]) AS dow_counts, a.fav_dow, a.fav_hour,
           c.cadence, a.last_at + c.cadence * interval '1 day' AS predicted,
           seg_lifecycle(a.orders, a.first_at, a.last_at, c.cadence, CAST(:now AS timestamptz)) AS lifecycle,
           CASE WHEN st.rfm IS NULL OR a.orders IS NULL THEN NULL ELSE seg_quintile(
               extract(epoch FROM CAST(:now AS timestamptz) - a.last_at)::float8 / 86400,
               ARRAY(SELECT jsonb_array_elements_text(st.rfm -> 'r')::float8), true) END AS rfm_r,
           CASE WHEN st.rfm IS NULL OR a.orders IS NULL THEN NULL ELSE seg_quintile(
               a.orders::float8, ARRAY(SELECT jsonb_array_elements_text(st.rfm -> 'f')::float8), false) END AS rfm_f,
           CASE WHEN st.rfm IS NULL OR a.orders IS NULL THEN NULL ELSE seg_quintile(
               a.revenue::float8, ARRAY(SELECT jsonb_array_elements_text(st.rfm -> 'm')::float8), false) END AS rfm_m,
           CASE WHEN a.orders IS NULL THEN NULL
                WHEN a.margin <= 0.02 * a.revenue THEN 'unprofitable'
                WHEN st.core_margin IS NOT NULL AND a.margin >= st.core_margin THEN 'core'
                ELSE 'middle' END AS value_tier,
           coalesce(e.engagement, '{}'::jsonb) AS engagement,
           tr.fb_rating, tr.fb_topic, tr.fb_at
    FROM ids
    LEFT JOIN agg a USING (customer_id) LEFT JOIN cad c USING (customer_id)
    LEFT JOIN cat_top ct USING (customer_id) LEFT JOIN sku_top sk USING (customer_id)
    LEFT JOIN sizes sz USING (customer_id) LEFT JOIN colors co USING (customer_id)
    LEFT JOIN tr USING (customer_id) LEFT JOIN eng e USING (customer_id)
    CROSS JOIN st
)
INSERT INTO profiles (customer_id, traits, consents, acquisition_channel, first_purchase_at, last_purchase_at, orders,
    revenue, margin, avg_check, discount_share, discounted_orders_share, discount_affinity, top_categories,
    favourite_category, favourite_product, favourite_size, favourite_color, dow_counts, favourite_dow, favourite_hour,
    cadence_days, predicted_next_purchase, lifecycle, rfm_r, rfm_f, rfm_m, rfm_group, value_tier, engagement,
    last_feedback_rating, last_feedback_topic, last_feedback_at, updated_at)
SELECT customer_id, traits, consents, acquisition_channel, first_at, last_at, orders, revenue, margin, avg_check,
    discount_share, discounted_share, discount_affinity, top_categories, favourite_category, favourite_product,
    favourite_size, favourite_color, dow_counts, fav_dow, fav_hour, cadence, predicted, lifecycle, rfm_r, rfm_f, rfm_m,
    seg_rfm_group(rfm_r, rfm_f, rfm_m), value_tier, engagement, fb_rating, fb_topic, fb_at, CAST(:now AS timestamptz)
FROM calc
ON CONFLICT (customer_id) DO UPDATE SET
    traits = excluded.traits, consents = excluded.consents, acquisition_channel = excluded.acquisition_channel,
    first_purchase_at = excluded.first_purchase_at, last_purchase_at = excluded.last_purchase_at,
    orders = excluded.orders, revenue = excluded.revenue, margin = excluded.margin, avg_check = excluded.avg_check,
    discount_share = excluded.discount_share, discounted_orders_share = excluded.discounted_orders_share,
    discount_affinity = excluded.discount_affinity, top_categories = excluded.top_categories,
    favourite_category = excluded.favourite_category, favourite_product = excluded.favourite_product,
    favourite_size = excluded.favourite_size, favourite_color = excluded.favourite_color,
    dow_counts = excluded.dow_counts, favourite_dow = excluded.favourite_dow, favourite_hour = excluded.favourite_hour,
    cadence_days = excluded.cadence_days, predicted_next_purchase = excluded.predicted_next_purchase,
    lifecycle = excluded.lifecycle, rfm_r = excluded.rfm_r, rfm_f = excluded.rfm_f, rfm_m = excluded.rfm_m,
    rfm_group = excluded.rfm_group, value_tier = excluded.value_tier, engagement = excluded.engagement,
    last_feedback_rating = excluded.last_feedback_rating, last_feedback_topic = excluded.last_feedback_topic,
    last_feedback_at = excluded.last_feedback_at, updated_at = excluded.updated_at
"""

DIGEST_SQL = """jsonb_strip_nulls(jsonb_build_object(
    'first_name', p.traits ->> 'first_name',
    'favourite_product', p.favourite_product,
    'favourite_category', p.favourite_category,
    'favourite_size', p.favourite_size,
    'favourite_color', p.favourite_color,
    'predicted_next_purchase', p.predicted_next_purchase,
    'value_tier', p.value_tier,
    'lifecycle', seg_lifecycle(p.orders, p.first_purchase_at, p.last_purchase_at, p.cadence_days, CAST(:now AS timestamptz)),
    'orders', p.orders,
    'revenue', p.revenue::text,
    'avg_check', p.avg_check::text,
    'discount_affinity', p.discount_affinity,
    'last_feedback_rating', p.last_feedback_rating,
    'last_feedback_topic', p.last_feedback_topic,
    'consents', p.consents))"""


@dataclass(slots=True)
class SegmentRule:
    """A segment with its rule compiled (bind parameters prefixed per segment)."""

    id: str
    key: str
    sql: str
    params: dict[str, Any]


# Matches are compared per customer as bit masks, one bigint per chunk of this many segments.
MASK_BITS = 63


def _mask_chunks(count: int) -> list[range]:
    return [range(c, min(c + MASK_BITS, count)) for c in range(0, count, MASK_BITS)]


def membership_sql(count: int, *, restricted: bool) -> str:
    """One statement that applies many segments' rules in one pass over profiles:
    diff against current memberships, enter, exit, log and publish through the outbox.

    Each profile is read once and all rules are evaluated on it into bit masks (bit i of the
    masks is rule i); a customer's current memberships fold into the same masks, and only the
    customers whose masks differ are expanded back into (segment, customer) entries and exits.
    """
    only = "WHERE p.customer_id = ANY(CAST(:ids AS text[]))" if restricted else ""
    only_m = "WHERE m.customer_id = ANY(CAST(:ids AS text[]))" if restricted else ""
    chunks = _mask_chunks(count)
    matched = ", ".join(
        " | ".join(f"(CASE WHEN ({{rule{i}}}) THEN {1 << (i % MASK_BITS)}::bigint ELSE 0::bigint END)" for i in chunk)
        for chunk in chunks
    )
    member = ", ".join(
        f"coalesce(bit_or(1::bigint << segs.bit) FILTER (WHERE segs.chunk = {n + 1}), 0)" for n in range(len(chunks))
    )
    zeros = ", ".join("0" for _ in chunks)
    return f"""
WITH segs AS (
    SELECT sid, skey, (k - 1)::int / {MASK_BITS} + 1 AS chunk, (k - 1)::int % {MASK_BITS} AS bit
    FROM unnest(CAST(:sids AS text[]), CAST(:skeys AS text[])) WITH ORDINALITY AS u(sid, skey, k)
),
matched AS (SELECT p.customer_id, ARRAY[{matched}] AS mask FROM profiles p {only}),
member AS (
    SELECT m.customer_id, ARRAY[{member}] AS mask
    FROM memberships m JOIN segs ON segs.sid = m.segment_id {only_m} GROUP BY m.customer_id
),
changed AS MATERIALIZED (
    SELECT customer_id, coalesce(n.mask, ARRAY[{zeros}]::bigint[]) AS now_mask,
           coalesce(w.mask, ARRAY[{zeros}]::bigint[]) AS was_mask
    FROM matched n FULL JOIN member w USING (customer_id)
    WHERE coalesce(n.mask, ARRAY[{zeros}]::bigint[]) <> coalesce(w.mask, ARRAY[{zeros}]::bigint[])
),
diff AS MATERIALIZED (
    SELECT segs.sid, c.customer_id, (c.now_mask[segs.chunk] >> segs.bit) & 1 = 1 AS entering
    FROM changed c CROSS JOIN segs
    WHERE ((c.now_mask[segs.chunk] # c.was_mask[segs.chunk]) >> segs.bit) & 1 = 1
),
entered AS (
    INSERT INTO memberships (segment_id, customer_id, entered_at)
    SELECT sid, customer_id, CAST(:now AS timestamptz) FROM diff WHERE entering
    ON CONFLICT DO NOTHING RETURNING segment_id, customer_id
),
exited AS (
    DELETE FROM memberships m USING diff d
    WHERE NOT d.entering AND m.segment_id = d.sid AND m.customer_id = d.customer_id
    RETURNING m.segment_id, m.customer_id
),
logged AS (
    INSERT INTO membership_log (segment_id, customer_id, change, at)
    SELECT segment_id, customer_id, change, CAST(:now AS timestamptz) FROM (
        SELECT segment_id, customer_id, 'entered' AS change FROM entered
        UNION ALL SELECT segment_id, customer_id, 'exited' FROM exited) ch
    RETURNING id, segment_id, customer_id, change
),
-- a customer's profile digest is built once, however many segments they entered or left
digest AS (
    SELECT c.customer_id, {DIGEST_SQL} AS profile
    FROM (SELECT DISTINCT customer_id FROM logged) c LEFT JOIN profiles p ON p.customer_id = c.customer_id
),
published AS (
    INSERT INTO outbox (topic, key, value)
    SELECT '{TOPIC_SEGMENTS}', l.customer_id, convert_to(jsonb_build_object(
        'id', 'segchg:' || l.id,
        'type', 'segment.' || l.change,
        'customer_id', l.customer_id,
        'occurred_at', CAST(:now_iso AS text),
        'segment_id', l.segment_id,
        'segment_key', segs.skey,
        'profile', coalesce(d.profile, '{{}}'::jsonb))::text, 'UTF8')
    FROM logged l JOIN segs ON segs.sid = l.segment_id JOIN digest d ON d.customer_id = l.customer_id
    RETURNING 1
)
SELECT l.segment_id, l.change, count(*) AS n, (SELECT count(*) FROM published) AS published
FROM logged l GROUP BY 1, 2
"""


# Consumers take this lock shared (they touch disjoint customers); sweeps and segment edits take
# it exclusively, so a full re-evaluation never races a batch on stale profiles.
MEMBERSHIP_LOCK = 0x5E6A11


class ProfileRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def recompute(self, customer_ids: Sequence[str], *, now: datetime, decay_days: float) -> None:
        """Recompute every feature of these customers from their facts (one statement)."""
        if not customer_ids:
            return
        await disable_jit(self.session)
        await self.session.execute(text(RECOMPUTE_SQL), {"ids": list(customer_ids), "now": now, "decay": decay_days})

    async def refresh_lifecycle(self, *, now: datetime) -> int:
        """Move profiles whose lifecycle changed with the passage of time."""
        result = await self.session.execute(
            text(
                "UPDATE profiles SET lifecycle = seg_lifecycle(orders, first_purchase_at, last_purchase_at, cadence_days, "
                "CAST(:now AS timestamptz)) WHERE lifecycle IS DISTINCT FROM seg_lifecycle(orders, first_purchase_at, "
                "last_purchase_at, cadence_days, CAST(:now AS timestamptz))"
            ),
            {"now": now},
        )
        return result.rowcount or 0  # type: ignore[attr-defined]

    async def refresh_rfm(self, *, now: datetime) -> int:
        """Recompute RFM quintile cut points and the core-margin threshold, then score every buyer."""
        await self.session.execute(
            text(
                "INSERT INTO feature_stats (key, value, updated_at) "
                "SELECT 'rfm', jsonb_build_object("
                "  'r', to_jsonb(percentile_cont(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP ("
                "        ORDER BY extract(epoch FROM CAST(:now AS timestamptz) - last_purchase_at)::float8 / 86400)),"
                "  'f', to_jsonb(percentile_cont(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY orders::float8)),"
                "  'm', to_jsonb(percentile_cont(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY revenue::float8))),"
                "  CAST(:now AS timestamptz) FROM profiles WHERE orders > 0 HAVING count(*) > 0 "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
            ),
            {"now": now},
        )
        await self.session.execute(
            text(
                "INSERT INTO feature_stats (key, value, updated_at) "
                "SELECT 'value_tiers', jsonb_build_object('core_margin', percentile_cont(0.8) WITHIN GROUP (ORDER BY margin::float8)),"
                " CAST(:now AS timestamptz) FROM profiles WHERE orders > 0 AND margin > 0.02 * revenue HAVING count(*) > 0 "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
            ),
            {"now": now},
        )
        result = await self.session.execute(
            text(
                "WITH st AS (SELECT ARRAY(SELECT jsonb_array_elements_text(value -> 'r')::float8) AS r,"
                "  ARRAY(SELECT jsonb_array_elements_text(value -> 'f')::float8) AS f,"
                "  ARRAY(SELECT jsonb_array_elements_text(value -> 'm')::float8) AS m FROM feature_stats WHERE key = 'rfm'),"
                " vt AS (SELECT (SELECT (value ->> 'core_margin')::float8 FROM feature_stats WHERE key = 'value_tiers') AS core),"
                " s AS (SELECT p.customer_id,"
                "  seg_quintile(extract(epoch FROM CAST(:now AS timestamptz) - p.last_purchase_at)::float8 / 86400, st.r, true) AS r,"
                "  seg_quintile(p.orders::float8, st.f, false) AS f, seg_quintile(p.revenue::float8, st.m, false) AS m,"
                "  CASE WHEN p.margin <= 0.02 * p.revenue THEN 'unprofitable'"
                "       WHEN vt.core IS NOT NULL AND p.margin >= vt.core THEN 'core' ELSE 'middle' END AS tier"
                "  FROM profiles p CROSS JOIN st CROSS JOIN vt WHERE p.orders > 0) "
                "UPDATE profiles p SET rfm_r = s.r, rfm_f = s.f, rfm_m = s.m, rfm_group = seg_rfm_group(s.r, s.f, s.m),"
                " value_tier = s.tier FROM s WHERE p.customer_id = s.customer_id AND"
                " (p.rfm_r, p.rfm_f, p.rfm_m, p.value_tier) IS DISTINCT FROM (s.r, s.f, s.m, s.tier)"
            ),
            {"now": now},
        )
        return result.rowcount or 0  # type: ignore[attr-defined]

    async def get(self, customer_id: str, *, now: datetime) -> dict[str, Any] | None:
        """A profile with its time-relative features as of `now`."""
        row = (
            (
                await self.session.execute(
                    text(
                        "SELECT p.*, l.lifecycle AS lifecycle_now, seg_churn_kind(l.lifecycle, p.orders) AS churn_kind,"
                        " extract(epoch FROM CAST(:now AS timestamptz) - p.last_purchase_at)::float8 / 86400 AS days_since_last_purchase"
                        " FROM profiles p CROSS JOIN LATERAL (SELECT seg_lifecycle(p.orders, p.first_purchase_at, p.last_purchase_at,"
                        " p.cadence_days, CAST(:now AS timestamptz)) AS lifecycle) l WHERE p.customer_id = :c"
                    ),
                    {"c": customer_id, "now": now},
                )
            )
            .mappings()
            .first()
        )
        if not row:
            return None
        out = dict(row)
        out["lifecycle"] = out.pop("lifecycle_now")
        return out

    async def segments_of(self, customer_id: str) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT s.id, s.key, s.name, m.entered_at FROM memberships m JOIN segments s ON s.id = m.segment_id "
                "WHERE m.customer_id = :c ORDER BY s.key"
            ),
            {"c": customer_id},
        )
        return [dict(r) for r in rows.mappings()]


class SegmentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT s.*, (SELECT count(*) FROM memberships m WHERE m.segment_id = s.id) AS size "
                "FROM segments s ORDER BY s.key"
            )
        )
        return [dict(r) for r in rows.mappings()]

    async def all_rules(self) -> list[dict[str, Any]]:
        rows = await self.session.execute(text("SELECT id, key, rule FROM segments ORDER BY key"))
        return [dict(r) for r in rows.mappings()]

    async def get(self, id_or_key: str) -> dict[str, Any] | None:
        row = (
            (
                await self.session.execute(
                    text(
                        "SELECT s.*, (SELECT count(*) FROM memberships m WHERE m.segment_id = s.id) AS size "
                        "FROM segments s WHERE s.id = :k OR s.key = :k LIMIT 1"
                    ),
                    {"k": id_or_key},
                )
            )
            .mappings()
            .first()
        )
        return dict(row) if row else None

    async def insert(
        self,
        *,
        id: str,
        key: str,
        name: str,
        description: str | None,
        rule_json: str,
        builtin: bool,
        now: datetime,
    ) -> bool:
        """Insert a segment; False if the key is taken."""
        result = await self.session.execute(
            text(
                "INSERT INTO segments (id, key, name, description, rule, builtin, version, created_at, updated_at) "
                "VALUES (:id, :key, :name, :d, CAST(:rule AS jsonb), :b, 1, :now, :now) ON CONFLICT DO NOTHING RETURNING id"
            ),
            {
                "id": id,
                "key": key,
                "name": name,
                "d": description,
                "rule": rule_json,
                "b": builtin,
                "now": now,
            },
        )
        return result.first() is not None

    async def update(
        self, segment_id: str, *, name: str, description: str | None, rule_json: str, now: datetime
    ) -> None:
        await self.session.execute(
            text(
                "UPDATE segments SET name = :name, description = :d, rule = CAST(:rule AS jsonb), version = version + 1, "
                "updated_at = :now WHERE id = :id"
            ),
            {"id": segment_id, "name": name, "d": description, "rule": rule_json, "now": now},
        )

    async def delete(self, segment_id: str) -> None:
        await self.session.execute(text("DELETE FROM segments WHERE id = :id"), {"id": segment_id})

    async def lock_memberships(self, *, exclusive: bool) -> None:
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        await self.session.execute(text(f"SELECT {fn}(:k)"), {"k": MEMBERSHIP_LOCK})
        await disable_jit(self.session)
        if exclusive:
            # A full pass hashes every membership against every match; keep that join in memory.
            await self.session.execute(text("SET LOCAL work_mem = '256MB'"))

    async def apply(
        self, rules: Sequence[SegmentRule], *, now: datetime, customer_ids: Sequence[str] | None
    ) -> dict[str, dict[str, int]]:
        """Apply compiled rules to the given customers (or everyone); return entered/exited counts per segment key."""
        out = {r.key: {"entered": 0, "exited": 0} for r in rules}
        if not rules or (customer_ids is not None and not customer_ids):
            return out
        sql = membership_sql(len(rules), restricted=customer_ids is not None)
        bind: dict[str, Any] = {
            "sids": [r.id for r in rules],
            "skeys": [r.key for r in rules],
            "now": now,
            "now_iso": now.isoformat(),
        }
        rule_sql = {}
        for i, r in enumerate(rules):
            bind.update(r.params)
            rule_sql[f"rule{i}"] = r.sql
        if customer_ids is not None:
            bind["ids"] = list(customer_ids)
        # Rule SQL is generated by the compiler (literals are bound), so plain substitution is safe.
        statement = sql
        for name, rsql in rule_sql.items():
            statement = statement.replace("{" + name + "}", rsql, 1)
        keys = {r.id: r.key for r in rules}
        for row in await self.session.execute(text(statement), bind):
            out[keys[row[0]]][row[1]] = int(row[2])
            mark_outbox_written(self.session)
        return out

    async def count_matching(
        self, *, rule_sql: str, params: dict[str, Any], now: datetime, sample: int
    ) -> tuple[int, list[str]]:
        bind = {**params, "now": now}
        total = (
            await self.session.execute(text(f"SELECT count(*) FROM profiles p WHERE {rule_sql}"), bind)
        ).scalar_one()
        rows = await self.session.execute(
            text(f"SELECT p.customer_id FROM profiles p WHERE {rule_sql} ORDER BY p.customer_id LIMIT :lim"),
            {**bind, "lim": sample},
        )
        return int(total), [r[0] for r in rows]

    async def exit_all(self, *, segment_id: str, segment_key: str, now: datetime) -> int:
        """Everyone leaves (the segment is being deleted): log and publish the exits."""
        result = await self.apply([SegmentRule(segment_id, segment_key, "false", {})], now=now, customer_ids=None)
        return result[segment_key]["exited"]

    async def members(self, segment_id: str, *, after: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT customer_id, entered_at FROM memberships WHERE segment_id = :s AND (CAST(:after AS text) IS NULL "
                "OR customer_id > CAST(:after AS text)) ORDER BY customer_id LIMIT :lim"
            ),
            {"s": segment_id, "after": after, "lim": limit},
        )
        return [dict(r) for r in rows.mappings()]

    async def record_sizes(self, *, now: datetime) -> None:
        await self.session.execute(
            text(
                "INSERT INTO segment_sizes (segment_id, at, size) "
                "SELECT s.id, CAST(:now AS timestamptz), coalesce(c.n, 0) FROM segments s "
                "LEFT JOIN (SELECT segment_id, count(*) AS n FROM memberships GROUP BY 1) c ON c.segment_id = s.id "
                "ON CONFLICT (segment_id, at) DO UPDATE SET size = excluded.size"
            ),
            {"now": now},
        )

    async def size_history(self, segment_id: str, *, limit: int) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text("SELECT at, size FROM segment_sizes WHERE segment_id = :s ORDER BY at DESC LIMIT :lim"),
            {"s": segment_id, "lim": limit},
        )
        return [dict(r) for r in rows.mappings()]


class ReportRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def pareto(self) -> dict[str, Any]:
        row = (
            (
                await self.session.execute(
                    text(
                        "WITH r AS (SELECT revenue, row_number() OVER (ORDER BY revenue DESC, customer_id) AS rk, count(*) OVER () AS n,"
                        " sum(revenue) OVER () AS total FROM profiles WHERE orders > 0) "
                        "SELECT max(n) AS customers, max(total) AS revenue,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.01)) AS top1,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.05)) AS top5,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.10)) AS top10,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.20)) AS top20,"
                        " sum(revenue) FILTER (WHERE rk <= ceil(n * 0.50)) AS top50 FROM r"
                    )
                )
            )
            .mappings()
            .one()
        )
        total = row["revenue"] or Decimal(0)
        shares = []
        for pct, col in (
            (1, "top1"),
            (5, "top5"),
            (10, "top10"),
            (20, "top20"),
            (50, "top50"),
            (100, None),
        ):
            part = total if col is None else (row[col] or Decimal(0))
            shares.append(
                {
                    "top_percent": pct,
                    "revenue": part,
                    "share": float(part / total) if total else 0.0,
                }
            )
        return {"customers": int(row["customers"] or 0), "revenue": total, "shares": shares}

    async def rfm_grid(self) -> dict[str, Any]:
        cells = await self.session.execute(
            text(
                "SELECT rfm_r AS r, rfm_f AS f, count(*) AS customers, sum(revenue) AS revenue FROM profiles "
                "WHERE rfm_r IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
            )
        )
        groups = await self.session.execute(
            text(
                "SELECT rfm_group AS group, count(*) AS customers, sum(revenue) AS revenue FROM profiles "
                "WHERE rfm_group IS NOT NULL GROUP BY 1 ORDER BY 1"
            )
        )
        stats = (
            await self.session.execute(text("SELECT value, updated_at FROM feature_stats WHERE key = 'rfm'"))
        ).first()
        return {
            "cells": [dict(r) for r in cells.mappings()],
            "groups": [dict(r) for r in groups.mappings()],
            "cut_points": stats[0] if stats else None,
            "refreshed_at": stats[1] if stats else None,
        }

    async def by_acquisition_channel(self, *, now: datetime) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            text(
                "SELECT coalesce(acquisition_channel, 'unknown') AS channel, count(*) AS customers,"
                " count(*) FILTER (WHERE orders > 0) AS buyers, sum(revenue) AS revenue,"
                " round(sum(revenue) / nullif(count(*) FILTER (WHERE orders > 0), 0), 4) AS revenue_per_buyer,"
                " (count(*) FILTER (WHERE orders >= 2))::float8 / nullif(count(*) FILTER (WHERE orders > 0), 0) AS repeat_rate,"
                " (count(*) FILTER (WHERE orders > 0 AND seg_lifecycle(orders, first_purchase_at, last_purchase_at,"
                "   cadence_days, CAST(:now AS timestamptz)) IN ('new', 'active')))::float8"
                "   / nullif(count(*) FILTER (WHERE orders > 0), 0) AS retained_rate "
                "FROM profiles GROUP BY 1 ORDER BY revenue DESC NULLS LAST, 1"
            ),
            {"now": now},
        )
        return [dict(r) for r in rows.mappings()]
