"""Profiles: every feature of a customer recomputed from their facts, time-relative refreshes, reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from segmentation import models


async def disable_jit(session: AsyncSession) -> None:
    """Rule statements look expensive to the planner (many subplans) but run fast; JIT compiling
    them costs seconds per statement, so it is off for this transaction."""
    await session.execute(text("SET LOCAL jit = off"))


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


class ProfileRepository:
    """Profiles are derived state: written only by the recompute and the sweeps' refreshes."""

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
        """The segments a customer is in now, by key."""
        segments, memberships = models.Segment, models.Membership
        rows = await self.session.execute(
            select(segments.id, segments.key, segments.name, memberships.entered_at)
            .join(segments, segments.id == memberships.segment_id)
            .where(memberships.customer_id == customer_id)
            .order_by(segments.key)
        )
        return [dict(r) for r in rows.mappings()]
