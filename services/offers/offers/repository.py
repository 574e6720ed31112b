"""Every query of the offers service, over the caller's session (the caller's boundary commits).

The decision rules live in one statement, `DECIDE_SQL`: audience, global and campaign control
(the `offers_bucket` hash), the economics guard, once-per-customer, cooldown, priority within the
collision window, budgets. Consumers, sweeps and the dry-run all run it, over different candidate
sets: the same rule is never written twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_CAMPAIGN_COLS = (
    "id, name, state, version, definition, trigger_kind, priority, starts_at, ends_at, messages_sent, cost_spent, "
    "created_at, updated_at, activated_at, ended_at"
)
_DECISION_COLS = (
    "campaign_id, version, customer_id, occurrence, outcome, at, decided_at, message_id, cost, variables, "
    "delivery_status, delivery_reason, delivery_channel"
)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


# Candidates: (c campaign id, k customer id, o occurrence, at trigger moment, pre outcome decided by
# the trigger itself: already_bought, outside_window). `{cand}` is a SELECT with those columns.
_DECIDE_CORE = """
camp AS (
    SELECT x.*, coalesce(cs.messages_sent, 0) AS sent_n, coalesce(cs.cost_spent, 0) AS sent_cost
    FROM json_to_recordset(CAST(:camps AS json)) AS x(
        id text, version int, priority int, inc text[], exc text[], tiers text[], conds jsonb, control float8,
        once boolean, cooldown_days float8, collision_min float8, budget_n bigint, budget_cost numeric,
        guard boolean, guard_tiers text[], min_margin numeric, disc_kind text, disc_value numeric,
        min_basket numeric, channel text)
    LEFT JOIN campaigns cs ON cs.id = x.id
),
cand AS (
    SELECT DISTINCT ON (q.c, q.k, q.o) q.c, q.k, q.o, q.at, q.pre
    FROM ({cand}) q JOIN camp ON camp.id = q.c ORDER BY q.c, q.k, q.o, q.at
),
keys AS (SELECT DISTINCT k FROM cand),
mem AS (
    SELECT m.customer_id, array_agg(m.segment_key) AS segs
    FROM memberships m JOIN keys ON keys.k = m.customer_id GROUP BY 1
),
s0 AS (
    SELECT cand.*, camp.version, camp.priority, camp.control, camp.once, camp.cooldown_days, camp.collision_min,
        camp.budget_n, camp.budget_cost, camp.sent_n, camp.sent_cost, camp.channel,
        cu.digest, cu.value_tier,
        (SELECT max(d.at) FROM decisions d WHERE d.campaign_id = cand.c AND d.customer_id = cand.k
            AND d.outcome IN ('requested', 'control')) AS last_at,
        (cardinality(camp.inc) = 0 OR coalesce(mem.segs && camp.inc, false))
            AND NOT coalesce(mem.segs && camp.exc, false)
            AND (cardinality(camp.tiers) = 0 OR coalesce(cu.value_tier = ANY(camp.tiers), false))
            AND (camp.conds = '[]'::jsonb OR offers_match(cu.digest, camp.conds)) AS in_audience,
        camp.guard, camp.guard_tiers, camp.min_margin,
        cu.margin / nullif(CAST(cu.digest ->> 'orders' AS numeric), 0) AS margin_per_order,
        CASE camp.disc_kind
            WHEN 'percent' THEN round(camp.disc_value / 100 * greatest(
                coalesce(CAST(cu.digest ->> 'avg_check' AS numeric), 0), coalesce(camp.min_basket, 0)), 4)
            WHEN 'fixed' THEN camp.disc_value
            WHEN 'free_delivery' THEN CAST(:delivery_cost AS numeric)
            ELSE 0 END AS unit_cost
    FROM cand JOIN camp ON camp.id = cand.c
    LEFT JOIN customers cu ON cu.customer_id = cand.k
    LEFT JOIN mem ON mem.customer_id = cand.k
),
-- materialised: each outcome (and its index probes) is computed once, not once per window reference
s1 AS MATERIALIZED (
    SELECT s0.*, CASE
        WHEN NOT in_audience THEN 'not_in_audience'
        WHEN offers_bucket(CAST(:gsalt AS text), k) < CAST(:gshare AS float8) THEN 'global_control'
        WHEN pre IS NOT NULL THEN pre
        WHEN guard AND (coalesce(value_tier = ANY(guard_tiers), false)
            OR (min_margin IS NOT NULL AND coalesce(margin_per_order - unit_cost < min_margin, true)))
            THEN 'economics_guard'
        WHEN once AND last_at IS NOT NULL THEN 'once_per_customer'
        WHEN cooldown_days IS NOT NULL AND last_at > at - cooldown_days * interval '1 day' THEN 'cooldown'
        -- per row through the (customer_id, at) index: a CTE of rivals would be scanned once per candidate
        WHEN collision_min > 0 AND EXISTS (
            SELECT 1 FROM decisions r WHERE r.customer_id = s0.k AND r.at > s0.at - s0.collision_min * interval '1 minute'
              AND r.outcome IN ('requested', 'control') AND r.campaign_id <> s0.c AND r.priority >= s0.priority)
            THEN 'lower_priority'
    END AS e1
    FROM s0
),
s2 AS MATERIALIZED (
    SELECT s1.*, CASE
        WHEN e1 IS NOT NULL THEN e1
        WHEN once AND row_number() OVER (PARTITION BY c, k, e1 IS NULL ORDER BY at, o) > 1 THEN 'once_per_customer'
        WHEN cooldown_days IS NOT NULL AND row_number() OVER (PARTITION BY c, k, e1 IS NULL ORDER BY at, o) > 1
            THEN 'cooldown'
        WHEN collision_min > 0 AND dense_rank() OVER (PARTITION BY k, e1 IS NULL ORDER BY priority DESC, c) > 1
            THEN 'lower_priority'
        WHEN offers_bucket(c, k) < control THEN 'control'
    END AS e2
    FROM s1
),
s3 AS (
    SELECT s2.*, CASE
        WHEN e2 IS NOT NULL THEN e2
        WHEN budget_n IS NOT NULL
            AND sent_n + row_number() OVER (PARTITION BY c, e2 IS NULL ORDER BY at, k, o) > budget_n
            THEN 'budget_exhausted'
        WHEN budget_cost IS NOT NULL AND sent_cost + sum(unit_cost) OVER (
            PARTITION BY c, e2 IS NULL ORDER BY at, k, o ROWS UNBOUNDED PRECEDING) > budget_cost
            THEN 'budget_exhausted'
        ELSE 'requested' END AS outcome
    FROM s2
)"""

DECIDE_SQL = (
    "WITH "
    + _DECIDE_CORE
    + """,
ins AS (
    INSERT INTO decisions AS d (campaign_id, version, customer_id, occurrence, outcome, priority, at, decided_at,
        message_id, cost)
    SELECT c, version, k, o, outcome, priority, at, CAST(:now AS timestamptz),
        CASE WHEN outcome = 'requested' THEN 'ofr-' || md5(c || ':' || version || ':' || k || ':' || o) END,
        CASE WHEN outcome = 'requested' THEN unit_cost END
    FROM s3
    ON CONFLICT ON CONSTRAINT uq_decisions_occurrence DO UPDATE SET
        outcome = excluded.outcome, version = excluded.version, priority = excluded.priority, at = excluded.at,
        decided_at = excluded.decided_at, message_id = excluded.message_id, cost = excluded.cost
    WHERE d.outcome = 'waiting'
    RETURNING d.id, d.campaign_id, d.version, d.customer_id, d.occurrence, d.outcome, d.message_id, d.cost, d.at
),
spent AS (
    UPDATE campaigns cs SET messages_sent = cs.messages_sent + x.n, cost_spent = cs.cost_spent + x.cost
    FROM (SELECT campaign_id, count(*) AS n, coalesce(sum(cost), 0) AS cost
          FROM ins WHERE outcome = 'requested' GROUP BY 1) x
    WHERE cs.id = x.campaign_id
    RETURNING 1
)
SELECT ins.id, ins.campaign_id, ins.version, ins.customer_id, ins.occurrence, ins.outcome, ins.message_id,
    ins.cost, ins.at, cu.digest, cu.first_name, cu.timezone
FROM ins LEFT JOIN customers cu ON cu.customer_id = ins.customer_id
WHERE ins.outcome = 'requested'
"""
)

DRY_RUN_SQL = (
    "WITH "
    + _DECIDE_CORE
    + """
SELECT outcome, count(*) AS n,
    coalesce(sum(unit_cost) FILTER (WHERE outcome = 'requested'), 0) AS discount_cost,
    coalesce(sum(CASE
        WHEN channel = 'sms' THEN CAST(:sms_cost AS numeric)
        WHEN channel = 'email' THEN CAST(:email_cost AS numeric)
        WHEN channel = 'push' THEN CAST(:push_cost AS numeric)
        WHEN coalesce(CAST(digest -> 'consents' ->> 'push' AS boolean), false) THEN CAST(:push_cost AS numeric)
        WHEN coalesce(CAST(digest -> 'consents' ->> 'email' AS boolean), false) THEN CAST(:email_cost AS numeric)
        WHEN coalesce(CAST(digest -> 'consents' ->> 'sms' AS boolean), false) THEN CAST(:sms_cost AS numeric)
        ELSE 0 END) FILTER (WHERE outcome = 'requested'), 0) AS channel_cost
FROM s3 GROUP BY 1
"""
)

# Candidate sets (the `{cand}` of DECIDE_SQL).
CANDS_FROM_JSON = (
    "SELECT j.c, j.k, j.o, j.at, j.pre FROM json_to_recordset(CAST(:cands AS json)) "
    "AS j(c text, k text, o text, at timestamptz, pre text)"
)

_NOT_DECIDED = (
    "NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = CAST(:cid AS text) "
    "AND d.customer_id = cu.customer_id AND d.occurrence = {occ})"
)

INACTIVITY_CANDS = """
SELECT CAST(:cid AS text) AS c, cu.customer_id AS k, q.o, CAST(:now AS timestamptz) AS at, NULL::text AS pre
FROM customers cu
CROSS JOIN LATERAL (SELECT 'inactive:' || to_char(cu.last_purchase_at AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS') AS o) q
WHERE cu.last_purchase_at <= CAST(:now AS timestamptz) - make_interval(days => CAST(:days AS int))
  AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = CAST(:cid AS text)
                  AND d.customer_id = cu.customer_id AND d.occurrence = q.o)
LIMIT :batch
"""

# A purchase cycle is named by its predicted date; a purchase newer than the digest that predicted
# it means the customer already bought in that cycle; a prediction closer than min_days (or past)
# means the window was missed: both recorded once per cycle, never sent late.
WINDOW_CANDS = """
SELECT CAST(:cid AS text) AS c, cu.customer_id AS k, q.o, CAST(:now AS timestamptz) AS at,
    CASE WHEN cu.last_purchase_at > cu.digest_at THEN 'already_bought'
         WHEN cu.predicted_next_purchase < CAST(:now AS timestamptz) + make_interval(days => CAST(:min_days AS int))
             THEN 'outside_window' END AS pre
FROM customers cu
CROSS JOIN LATERAL (
    SELECT 'cycle:' || to_char(cu.predicted_next_purchase AT TIME ZONE 'UTC', 'YYYYMMDD') AS o) q
WHERE cu.predicted_next_purchase IS NOT NULL
  AND cu.predicted_next_purchase <= CAST(:now AS timestamptz) + make_interval(days => CAST(:max_days AS int))
  AND cu.predicted_next_purchase > CAST(:now AS timestamptz) - make_interval(days => 30)
  AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = CAST(:cid AS text)
                  AND d.customer_id = cu.customer_id AND d.occurrence = q.o)
LIMIT :batch
"""

# The scheduled local instant of each customer: `local_time` on the current occurrence date in their
# own time zone; due once it has passed (and for at most a day, so a late joiner gets no stale broadcast).
SCHEDULE_CANDS = """
SELECT CAST(:cid AS text) AS c, cu.customer_id AS k, 'sched:' || to_char(b.d, 'YYYY-MM-DD') AS o, s.inst AS at,
    NULL::text AS pre
FROM customers cu
CROSS JOIN LATERAL (SELECT coalesce(cu.timezone, CAST(:tz AS text)) AS tz) z
CROSS JOIN LATERAL (
    SELECT CAST(:start AS date) + CASE WHEN CAST(:every AS int) IS NULL THEN 0 ELSE greatest(0,
        (CAST((CAST(:now AS timestamptz) AT TIME ZONE z.tz) AS date) - CAST(:start AS date))
        / CAST(:every AS int) * CAST(:every AS int)) END AS d0) a
CROSS JOIN LATERAL (
    SELECT CASE WHEN CAST(:every AS int) IS NOT NULL
                 AND (a.d0 + CAST(:t AS time)) AT TIME ZONE z.tz > CAST(:now AS timestamptz)
            THEN a.d0 - CAST(:every AS int) ELSE a.d0 END AS d) b
CROSS JOIN LATERAL (SELECT (b.d + CAST(:t AS time)) AT TIME ZONE z.tz AS inst) s
WHERE b.d >= CAST(:start AS date) AND (CAST(:until AS date) IS NULL OR b.d <= CAST(:until AS date))
  AND s.inst <= CAST(:now AS timestamptz) AND s.inst > CAST(:now AS timestamptz) - interval '1 day'
  AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = CAST(:cid AS text)
                  AND d.customer_id = cu.customer_id AND d.occurrence = 'sched:' || to_char(b.d, 'YYYY-MM-DD'))
LIMIT :batch
"""

BIRTHDAY_CANDS = """
SELECT CAST(:cid AS text) AS c, cu.customer_id AS k, 'bday:' || to_char(q.target, 'YYYY') AS o, q.inst AS at,
    NULL::text AS pre
FROM customers cu
CROSS JOIN LATERAL (SELECT coalesce(cu.timezone, CAST(:tz AS text)) AS tz) z
CROSS JOIN LATERAL (SELECT CAST((CAST(:now AS timestamptz) AT TIME ZONE z.tz) AS date) AS today) l
CROSS JOIN LATERAL (
    SELECT l.today + CAST(:days_before AS int) AS target, (l.today + CAST(:t AS time)) AT TIME ZONE z.tz AS inst) q
WHERE cu.birth_date IS NOT NULL
  AND extract(month FROM cu.birth_date) = extract(month FROM q.target)
  AND extract(day FROM cu.birth_date) = extract(day FROM q.target)
  AND q.inst <= CAST(:now AS timestamptz)
  AND NOT EXISTS (SELECT 1 FROM decisions d WHERE d.campaign_id = CAST(:cid AS text)
                  AND d.customer_id = cu.customer_id AND d.occurrence = 'bday:' || to_char(q.target, 'YYYY'))
LIMIT :batch
"""

ALL_CUSTOMERS_CANDS = """
SELECT CAST(:cid AS text) AS c, cu.customer_id AS k, 'dry-run' AS o, CAST(:now AS timestamptz) AS at, NULL::text AS pre
FROM customers cu
"""

SEGMENT_MEMBERS_CANDS = """
SELECT CAST(:cid AS text) AS c, m.customer_id AS k, 'dry-run' AS o, CAST(:now AS timestamptz) AS at, NULL::text AS pre
FROM memberships m WHERE m.segment_key = CAST(:segment_key AS text)
"""


class OffersRepository:
    """The offers service's SQL."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _exec(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        return await self.session.execute(text(sql), params or {})

    # campaigns

    async def insert_campaign(self, row: dict[str, Any]) -> None:
        await self._exec(
            "INSERT INTO campaigns (id, name, state, version, definition, trigger_kind, priority, starts_at, ends_at, "
            "created_at, updated_at) VALUES (:id, :name, :state, :version, CAST(:definition AS jsonb), :trigger_kind, "
            ":priority, :starts_at, :ends_at, :now, :now)",
            {**row, "definition": _json(row["definition"])},
        )
        await self.insert_version(row["id"], row["version"], row["definition"], row["now"])

    async def insert_version(self, campaign_id: str, version: int, definition: dict[str, Any], now: datetime) -> None:
        await self._exec(
            "INSERT INTO campaign_versions (campaign_id, version, definition, created_at) "
            "VALUES (:c, :v, CAST(:d AS jsonb), :now) ON CONFLICT (campaign_id, version) "
            "DO UPDATE SET definition = excluded.definition, created_at = excluded.created_at",
            {"c": campaign_id, "v": version, "d": _json(definition), "now": now},
        )

    async def get_campaign(self, campaign_id: str, *, for_update: bool = False) -> dict[str, Any] | None:
        lock = " FOR UPDATE" if for_update else ""
        row = (
            (await self._exec(f"SELECT {_CAMPAIGN_COLS} FROM campaigns WHERE id = :id{lock}", {"id": campaign_id}))
            .mappings()
            .first()
        )
        return dict(row) if row else None

    async def list_campaigns(self, *, state: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        where = "WHERE state = :state" if state else ""
        rows = (
            await self._exec(
                f"SELECT {_CAMPAIGN_COLS} FROM campaigns {where} ORDER BY created_at, id LIMIT :limit OFFSET :offset",
                {"state": state, "limit": limit, "offset": offset},
            )
        ).mappings()
        total = (await self._exec(f"SELECT count(*) FROM campaigns {where}", {"state": state})).scalar_one()
        return [dict(r) for r in rows], int(total)

    async def update_campaign(self, campaign_id: str, changes: dict[str, Any]) -> None:
        params = dict(changes)
        sets = []
        for col in changes:
            if col == "definition":
                sets.append("definition = CAST(:definition AS jsonb)")
                params["definition"] = _json(changes["definition"])
            else:
                sets.append(f"{col} = :{col}")
        params["id"] = campaign_id
        await self._exec(f"UPDATE campaigns SET {', '.join(sets)} WHERE id = :id", params)

    async def versions(self, campaign_id: str) -> list[dict[str, Any]]:
        rows = await self._exec(
            "SELECT version, definition, created_at FROM campaign_versions WHERE campaign_id = :c ORDER BY version",
            {"c": campaign_id},
        )
        return [dict(r) for r in rows.mappings()]

    async def active_campaigns(self) -> list[dict[str, Any]]:
        rows = await self._exec(f"SELECT {_CAMPAIGN_COLS} FROM campaigns WHERE state = 'active' ORDER BY id")
        return [dict(r) for r in rows.mappings()]

    async def end_expired_campaigns(self, now: datetime) -> int:
        result = await self._exec(
            "UPDATE campaigns SET state = 'ended', ended_at = :now, updated_at = :now "
            "WHERE state IN ('active', 'paused') AND ends_at IS NOT NULL AND ends_at <= :now",
            {"now": now},
        )
        return int(result.rowcount or 0)

    async def lock_budgets(self, campaign_ids: Sequence[str]) -> None:
        """Serialise the batches that spend one campaign's budget (so a cap holds across replicas)."""
        if campaign_ids:
            await self._exec(
                "SELECT 1 FROM campaigns WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE",
                {"ids": list(campaign_ids)},
            )

    # customers

    async def upsert_customer_facts(self, rows: Sequence[dict[str, Any]], now: datetime) -> None:
        """Traits and purchases from events; a trait is written only when its event carried it."""
        if not rows:
            return
        params = {"rows": _json(rows), "now": now}
        cols = (
            "j(k text, first_name text, set_first_name boolean, timezone text, set_timezone boolean, "
            "birth_date date, set_birth_date boolean, last_purchase_at timestamptz, purchases int)"
        )
        await self._exec(
            "INSERT INTO customers (customer_id, updated_at) "
            f"SELECT j.k, :now FROM json_to_recordset(CAST(:rows AS json)) AS {cols} ON CONFLICT DO NOTHING",
            params,
        )
        await self._exec(
            f"""
            UPDATE customers cu SET
                first_name = CASE WHEN j.set_first_name THEN j.first_name ELSE cu.first_name END,
                timezone = CASE WHEN j.set_timezone THEN j.timezone ELSE cu.timezone END,
                birth_date = CASE WHEN j.set_birth_date THEN j.birth_date ELSE cu.birth_date END,
                last_purchase_at = greatest(cu.last_purchase_at, j.last_purchase_at),
                purchases = cu.purchases + coalesce(j.purchases, 0),
                updated_at = :now
            FROM json_to_recordset(CAST(:rows AS json)) AS {cols}
            WHERE cu.customer_id = j.k
            """,
            params,
        )

    async def add_purchased_items(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add purchased quantities per customer and SKU (rows already summed per key)."""
        if not rows:
            return
        await self._exec(
            """
            INSERT INTO customer_products AS p (customer_id, sku, name, category, size, color, quantity, last_at)
            SELECT j.k, j.sku, j.name, j.category, j.size, j.color, j.q, j.at
            FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, sku text, name text, category text, size text,
                color text, q numeric, at timestamptz)
            ON CONFLICT (customer_id, sku) DO UPDATE SET
                quantity = p.quantity + excluded.quantity, last_at = greatest(p.last_at, excluded.last_at),
                name = coalesce(excluded.name, p.name), category = coalesce(excluded.category, p.category),
                size = coalesce(excluded.size, p.size), color = coalesce(excluded.color, p.color)
            """,
            {"rows": _json(rows)},
        )

    async def behind_on_purchases(self, customer_ids: Sequence[str], since: datetime) -> list[str]:
        """Customers whose recent digest counts more orders than the purchases this service has applied."""
        rows = await self._exec(
            "SELECT customer_id FROM customers WHERE customer_id = ANY(CAST(:ids AS text[])) AND digest_at > :since "
            "AND CAST(digest ->> 'orders' AS int) > purchases",
            {"ids": list(customer_ids), "since": since},
        )
        return [r[0] for r in rows]

    async def favourite_products(self, customer_ids: Sequence[str], category: str) -> dict[str, dict[str, Any]]:
        """Each customer's most bought product in `category` (ties: the most recent)."""
        rows = await self._exec(
            "SELECT DISTINCT ON (customer_id) customer_id, sku, name, category, size, color FROM customer_products "
            "WHERE customer_id = ANY(CAST(:ids AS text[])) AND category = :cat "
            "ORDER BY customer_id, quantity DESC, last_at DESC, sku",
            {"ids": list(customer_ids), "cat": category},
        )
        return {r["customer_id"]: {k: v for k, v in r.items() if k != "customer_id"} for r in rows.mappings()}

    async def upsert_digests(self, rows: Sequence[dict[str, Any]], now: datetime) -> None:
        """The newest profile digest per customer (by the time segmentation computed it)."""
        if not rows:
            return
        await self._exec(
            """
            INSERT INTO customers AS cu (customer_id, first_name, digest, digest_at, value_tier,
                predicted_next_purchase, margin, updated_at)
            SELECT j.k, j.digest ->> 'first_name', j.digest, j.at, j.digest ->> 'value_tier',
                CAST(j.digest ->> 'predicted_next_purchase' AS timestamptz), j.margin, :now
            FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, digest jsonb, at timestamptz, margin numeric)
            ON CONFLICT (customer_id) DO UPDATE SET
                digest = excluded.digest, digest_at = excluded.digest_at, value_tier = excluded.value_tier,
                predicted_next_purchase = excluded.predicted_next_purchase,
                first_name = coalesce(excluded.first_name, cu.first_name),
                margin = coalesce(excluded.margin, cu.margin), updated_at = excluded.updated_at
            WHERE cu.digest_at IS NULL OR cu.digest_at <= excluded.digest_at
            """,
            {"rows": _json(rows), "now": now},
        )

    async def apply_memberships(self, entered: Sequence[dict[str, Any]], exited: Sequence[dict[str, Any]]) -> None:
        if exited:
            await self._exec(
                "DELETE FROM memberships m USING json_to_recordset(CAST(:rows AS json)) AS j(k text, s text) "
                "WHERE m.customer_id = j.k AND m.segment_key = j.s",
                {"rows": _json(exited)},
            )
        if entered:
            await self._exec(
                "INSERT INTO memberships (customer_id, segment_key, entered_at) "
                "SELECT j.k, j.s, j.at FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, s text, at timestamptz) "
                "ON CONFLICT DO NOTHING",
                {"rows": _json(entered)},
            )

    async def customers_needing_profile(self, ids: Sequence[str], stale_before: datetime) -> list[str]:
        """Customers whose digest is missing, older than `stale_before`, or older than their last purchase."""
        if not ids:
            return []
        rows = await self._exec(
            "SELECT k FROM unnest(CAST(:ids AS text[])) AS k LEFT JOIN customers cu ON cu.customer_id = k "
            "WHERE cu.digest_at IS NULL OR cu.digest_at < :stale OR cu.last_purchase_at > cu.digest_at",
            {"ids": list(ids), "stale": stale_before},
        )
        return [r[0] for r in rows]

    # timers

    async def start_timers(self, rows: Sequence[dict[str, Any]]) -> None:
        """Open a timer per (campaign, customer), or add the event's items to the open one; log `waiting`."""
        if not rows:
            return
        await self._exec(
            """
            WITH j AS (
                SELECT DISTINCT ON (c, k) * FROM json_to_recordset(CAST(:rows AS json))
                    AS x(c text, k text, o text, v int, priority int, at timestamptz, due timestamptz, ctx jsonb)
                ORDER BY c, k, at
            ),
            t AS (
                INSERT INTO timers AS t (campaign_id, customer_id, occurrence, version, state, started_at, due_at,
                    context)
                SELECT c, k, o, v, 'waiting', at, due, ctx FROM j
                ON CONFLICT (campaign_id, customer_id) WHERE state = 'waiting' DO UPDATE SET
                    context = jsonb_set(t.context, '{items}',
                        coalesce(t.context -> 'items', '[]') || coalesce(excluded.context -> 'items', '[]'))
                RETURNING t.campaign_id, t.customer_id, t.occurrence, t.version, t.started_at
            )
            INSERT INTO decisions (campaign_id, version, customer_id, occurrence, outcome, priority, at, decided_at)
            SELECT t.campaign_id, t.version, t.customer_id, t.occurrence, 'waiting', j.priority, t.started_at, :now
            FROM t JOIN j ON j.c = t.campaign_id AND j.k = t.customer_id
            ON CONFLICT ON CONSTRAINT uq_decisions_occurrence DO NOTHING
            """,
            {"rows": _json(rows), "now": rows[0]["now"]},
        )

    async def cancel_timers(
        self, purchases: Sequence[dict[str, Any]], now: datetime, *, campaign_ids: Sequence[str] | None = None
    ) -> int:
        """A purchase after a timer started cancels it; its decision becomes `already_bought`.
        With `campaign_ids`, only those campaigns' timers (an emptied cart closes cart reminders)."""
        if not purchases:
            return 0
        result = await self._exec(
            """
            WITH p AS (SELECT k, max(at) AS at FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, at timestamptz)
                       GROUP BY k),
            c AS (
                UPDATE timers t SET state = 'cancelled' FROM p
                WHERE t.state = 'waiting' AND t.customer_id = p.k AND t.started_at <= p.at
                  AND (CAST(:ids AS text[]) IS NULL OR t.campaign_id = ANY(CAST(:ids AS text[])))
                RETURNING t.campaign_id, t.customer_id, t.occurrence
            )
            UPDATE decisions d SET outcome = 'already_bought', decided_at = :now
            FROM c WHERE d.campaign_id = c.campaign_id AND d.customer_id = c.customer_id
              AND d.occurrence = c.occurrence AND d.outcome = 'waiting'
            """,
            {"rows": _json(purchases), "now": now, "ids": list(campaign_ids) if campaign_ids is not None else None},
        )
        return int(result.rowcount or 0)

    async def claim_due_timers(self, campaign_ids: Sequence[str], now: datetime, limit: int) -> list[dict[str, Any]]:
        """Due timers of active campaigns, marked fired (a purchase that arrived late still counts)."""
        rows = await self._exec(
            """
            WITH due AS (
                SELECT t.campaign_id, t.customer_id, t.occurrence FROM timers t
                WHERE t.state = 'waiting' AND t.due_at <= :now AND t.campaign_id = ANY(CAST(:ids AS text[]))
                ORDER BY t.due_at LIMIT :limit FOR UPDATE SKIP LOCKED
            )
            UPDATE timers t SET state = 'fired' FROM due
            WHERE t.campaign_id = due.campaign_id AND t.customer_id = due.customer_id
              AND t.occurrence = due.occurrence
            RETURNING t.campaign_id, t.customer_id, t.occurrence, t.started_at, t.due_at, t.context,
                (SELECT cu.last_purchase_at >= t.started_at FROM customers cu WHERE cu.customer_id = t.customer_id)
                    AS bought
            """,
            {"ids": list(campaign_ids), "now": now, "limit": limit},
        )
        return [dict(r) for r in rows.mappings()]

    # decisions

    async def decide(self, *, cand_sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run the decision statement; return the new `requested` decisions with the customer's digest."""
        rows = await self._exec(DECIDE_SQL.replace("{cand}", cand_sql), params)
        return [dict(r) for r in rows.mappings()]

    async def dry_run(self, *, cand_sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows = await self._exec(DRY_RUN_SQL.replace("{cand}", cand_sql), params)
        return [dict(r) for r in rows.mappings()]

    async def set_variables(self, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await self._exec(
                "UPDATE decisions d SET variables = j.v FROM json_to_recordset(CAST(:rows AS json)) AS j(id bigint, v jsonb) "
                "WHERE d.id = j.id",
                {"rows": _json(rows)},
            )

    async def record_deliveries(self, rows: Sequence[dict[str, Any]]) -> int:
        """The notifier's verdict on a requested message; a later state never gives way to an earlier one."""
        if not rows:
            return 0
        result = await self._exec(
            """
            UPDATE decisions d SET delivery_status = j.status, delivery_reason = j.reason,
                delivery_channel = coalesce(j.channel, d.delivery_channel),
                delivery_cost = coalesce(j.cost, d.delivery_cost), delivery_at = j.at
            FROM (SELECT DISTINCT ON (m) * FROM json_to_recordset(CAST(:rows AS json))
                  AS x(m text, status text, reason text, channel text, cost numeric, at timestamptz, rank int)
                  ORDER BY m, rank DESC, at DESC) j
            WHERE d.message_id = j.m AND d.message_id IS NOT NULL AND (d.delivery_at IS NULL OR d.delivery_status IS NULL
                OR j.rank >= CASE d.delivery_status WHEN 'deferred' THEN 0 WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2
                    WHEN 'opened' THEN 3 WHEN 'clicked' THEN 4 ELSE 1 END)
            """,
            {"rows": _json(rows)},
        )
        return int(result.rowcount or 0)

    async def record_campaign_points(self, rows: Sequence[dict[str, Any]]) -> int:
        """Bonus points loyalty booked because of a campaign, one row per loyalty event (a redelivery adds none)."""
        if not rows:
            return 0
        result = await self._exec(
            """
            INSERT INTO campaign_points (event_id, campaign_id, offer_id, customer_id, points, value, occurred_at)
            SELECT event_id, campaign_id, offer_id, customer_id, points, value, occurred_at
            FROM json_to_recordset(CAST(:rows AS json)) AS x(event_id text, campaign_id text, offer_id text,
                customer_id text, points numeric, value numeric, occurred_at timestamptz)
            ON CONFLICT (event_id) DO NOTHING
            """,
            {"rows": _json(rows)},
        )
        return int(result.rowcount or 0)

    async def upsert_loyalty(self, rows: Sequence[dict[str, Any]]) -> None:
        """The latest balance and tier per customer (`balance` / `tier` None: that one is unchanged)."""
        if not rows:
            return
        await self._exec(
            """
            INSERT INTO customer_loyalty AS c (customer_id, points_balance, balance_at, loyalty_tier, tier_at)
            SELECT k, balance, CASE WHEN balance IS NOT NULL THEN at END, tier, CASE WHEN tier IS NOT NULL THEN at END
            FROM json_to_recordset(CAST(:rows AS json)) AS x(k text, balance numeric, tier text, at timestamptz)
            ON CONFLICT (customer_id) DO UPDATE SET
                points_balance = coalesce(EXCLUDED.points_balance, c.points_balance),
                balance_at = coalesce(EXCLUDED.balance_at, c.balance_at),
                loyalty_tier = coalesce(EXCLUDED.loyalty_tier, c.loyalty_tier),
                tier_at = coalesce(EXCLUDED.tier_at, c.tier_at)
            """,
            {"rows": _json(rows)},
        )

    async def loyalty_of(self, customer_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each customer's cached loyalty balance and tier (only those loyalty told of)."""
        if not customer_ids:
            return {}
        rows = await self._exec(
            "SELECT c.customer_id, c.points_balance, c.loyalty_tier FROM unnest(CAST(:ids AS text[])) AS t(k) "
            "JOIN customer_loyalty c ON c.customer_id = t.k",
            {"ids": list(dict.fromkeys(customer_ids))},
        )
        return {r.customer_id: {"points_balance": r.points_balance, "loyalty_tier": r.loyalty_tier} for r in rows}

    async def customer_decisions(
        self, customer_id: str, *, campaign_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        where = "customer_id = :k" + (" AND campaign_id = :c" if campaign_id else "")
        rows = await self._exec(
            f"SELECT {_DECISION_COLS} FROM decisions WHERE {where} ORDER BY at DESC, id DESC LIMIT :limit",
            {"k": customer_id, "c": campaign_id, "limit": limit},
        )
        return [dict(r) for r in rows.mappings()]

    async def campaign_decisions(
        self, campaign_id: str, *, outcome: str | None, after: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """A page of the campaign's decisions in the order they were made (keyset on the id)."""
        where = "campaign_id = :c AND id > :after" + (" AND outcome = :o" if outcome else "")
        rows = await self._exec(
            f"SELECT id, {_DECISION_COLS} FROM decisions WHERE {where} ORDER BY id LIMIT :limit",
            {"c": campaign_id, "after": after or 0, "o": outcome, "limit": limit},
        )
        return [dict(r) for r in rows.mappings()]

    async def outcome_counts(self, campaign_id: str) -> dict[str, int]:
        rows = await self._exec(
            "SELECT outcome, count(*) FROM decisions WHERE campaign_id = :c GROUP BY 1", {"c": campaign_id}
        )
        return {r[0]: int(r[1]) for r in rows}


def money(value: Any) -> Decimal:
    return Decimal(str(value or 0))
