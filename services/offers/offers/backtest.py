"""The back-test: a campaign's definition evaluated over the history offers stores (purchases,
memberships, the customer cache), without sending or writing anything.

Who the trigger would have reached between `from` and `to`, in which arm (the live `offers_bucket`
hash, so a back-tested customer lands in the arm live evaluation would put them in), and what they
bought in the attribution window after. What it cannot replay is listed in the README and in every
answer's `limits`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import EventMessage
from crm_common.errors import InvalidInput
from offers.evaluation import Active, campaign_params
from offers.report import NET_REVENUE
from offers.schemas import CampaignDefinition, EventTrigger, Inactivity, PurchaseWindow, SegmentEntered
from offers.settings import Settings
from offers.triggers import event_matches

MAX_SPAN = timedelta(days=366)
MAX_LISTED = 1000

LIMITS = [
    "audience (segments, tiers, conditions) and the economics guard are read from today's memberships "
    "and profile digest, not as they were at each moment",
    "priority collisions with other campaigns and budgets are not simulated",
    "once_per_customer and cooldown are applied among the back-test's own assignments only",
]


class BacktestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: AwareDatetime = Field(alias="from", description="start of the period (inclusive)")
    to: AwareDatetime = Field(description="end of the period (exclusive)")

    @model_validator(mode="after")
    def _period(self) -> BacktestRequest:
        if self.to <= self.from_:
            raise ValueError("to must be after from")
        if self.to - self.from_ > MAX_SPAN:
            raise ValueError("the period may span at most 366 days")
        return self


class BacktestArm(BaseModel):
    members: int
    converted: int
    revenue: float
    revenue_per_member: float | None


class BacktestCustomer(BaseModel):
    customer_id: str
    at: datetime
    arm: str
    revenue: float
    orders: int


class BacktestRead(BaseModel):
    campaign_id: str
    trigger: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    attribution_days: int
    evaluated: int
    outcomes: dict[str, int]
    arms: dict[str, BacktestArm]
    customers: list[BacktestCustomer]
    customers_truncated: bool
    limits: list[str]


# Inactivity: each purchase not followed by another within `days` fires `days` after it.
INACTIVITY_SQL = """
SELECT s.customer_id AS k, s.occurred_at + make_interval(days => :days) AS at, NULL::text AS pre
FROM (SELECT customer_id, occurred_at,
        lead(occurred_at) OVER (PARTITION BY customer_id ORDER BY occurred_at) AS nxt
      FROM purchases WHERE occurred_at < :to) s
WHERE s.occurred_at + make_interval(days => :days) >= :from
  AND s.occurred_at + make_interval(days => :days) < :to
  AND (s.nxt IS NULL OR s.nxt > s.occurred_at + make_interval(days => :days))
"""

# Purchase window: the next purchase predicted at the last one plus the customer's mean interval so
# far; the sweep first sees it `max_days` before (never before the purchase itself); a prediction
# closer than `min_days` then is outside the window; a purchase before that moment ends the cycle.
WINDOW_SQL = """
WITH s AS (
    SELECT customer_id, occurred_at, row_number() OVER w AS n, first_value(occurred_at) OVER w AS first_at,
        lead(occurred_at) OVER w AS nxt
    FROM purchases WHERE occurred_at < :to
    WINDOW w AS (PARTITION BY customer_id ORDER BY occurred_at)
),
q AS (
    SELECT customer_id AS k, occurred_at, nxt,
        occurred_at + (occurred_at - first_at) / CAST(n - 1 AS float8) AS predicted
    FROM s WHERE n >= 2
),
f AS (SELECT k, nxt, predicted, greatest(occurred_at, predicted - make_interval(days => :max_days)) AS at FROM q)
SELECT k, at, CASE WHEN predicted < at + make_interval(days => :min_days) THEN 'outside_window' END AS pre
FROM f WHERE at >= :from AND at < :to AND (nxt IS NULL OR nxt > at)
"""

SEGMENT_SQL = """
SELECT customer_id AS k, entered_at AS at, NULL::text AS pre FROM memberships
WHERE segment_key = :segment_key AND entered_at >= :from AND entered_at < :to
"""

PURCHASES_SQL = """
SELECT event_id, customer_id, occurred_at, properties FROM purchases
WHERE occurred_at >= :from AND occurred_at < :to ORDER BY occurred_at, event_id
"""

# The live audience and guard rules of DECIDE_SQL, over today's cache, and both buckets.
EVALUATE_SQL = """
WITH camp AS (
    SELECT * FROM json_to_recordset(CAST(:camps AS json)) AS x(
        id text, inc text[], exc text[], tiers text[], conds jsonb, control float8, guard boolean,
        guard_tiers text[], min_margin numeric, disc_kind text, disc_value numeric, min_basket numeric)
),
cand AS (SELECT j.k, j.at, j.pre FROM json_to_recordset(CAST(:cands AS json)) AS j(k text, at timestamptz, pre text)),
mem AS (
    SELECT m.customer_id, array_agg(m.segment_key) AS segs FROM memberships m
    WHERE m.customer_id IN (SELECT k FROM cand) GROUP BY 1
)
SELECT cand.k, cand.at, cand.pre,
    (cardinality(camp.inc) = 0 OR coalesce(mem.segs && camp.inc, false))
        AND NOT coalesce(mem.segs && camp.exc, false)
        AND (cardinality(camp.tiers) = 0 OR coalesce(cu.value_tier = ANY(camp.tiers), false))
        AND (camp.conds = '[]'::jsonb OR offers_match(cu.digest, camp.conds)) AS in_audience,
    offers_bucket(CAST(:gsalt AS text), cand.k) < CAST(:gshare AS float8) AS global_control,
    offers_bucket(camp.id, cand.k) < camp.control AS control,
    camp.guard AND (coalesce(cu.value_tier = ANY(camp.guard_tiers), false)
        OR (camp.min_margin IS NOT NULL AND coalesce(
            cu.margin / nullif(CAST(cu.digest ->> 'orders' AS numeric), 0) - CASE camp.disc_kind
                WHEN 'percent' THEN round(camp.disc_value / 100 * greatest(
                    coalesce(CAST(cu.digest ->> 'avg_check' AS numeric), 0), coalesce(camp.min_basket, 0)), 4)
                WHEN 'fixed' THEN camp.disc_value
                WHEN 'free_delivery' THEN CAST(:delivery_cost AS numeric)
                ELSE 0 END < camp.min_margin, true))) AS guarded
FROM cand CROSS JOIN camp
LEFT JOIN customers cu ON cu.customer_id = cand.k
LEFT JOIN mem ON mem.customer_id = cand.k
"""

REVENUE_SQL = f"""
SELECT j.k, coalesce(x.revenue, 0) AS revenue, coalesce(x.orders, 0) AS orders
FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, at timestamptz)
LEFT JOIN LATERAL (
    SELECT sum(y.net) AS revenue, count(*) FILTER (WHERE y.net > 0) AS orders
    FROM (SELECT {NET_REVENUE} AS net FROM purchases p
          WHERE p.customer_id = j.k AND p.occurred_at > j.at
            AND p.occurred_at <= j.at + make_interval(days => :days)) y
) x ON true
"""


def _unsupported(kind: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"trigger {kind!r} cannot be back-tested: {why}",
        details={"errors": [{"loc": ["definition", "trigger", "kind"], "msg": why}]},
    )


async def _candidates(
    session: AsyncSession, definition: CampaignDefinition, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """(customer, trigger moment, the trigger's own verdict) over the stored history."""
    t = definition.trigger
    period = {"from": start, "to": end}
    if isinstance(t, Inactivity):
        sql, params = INACTIVITY_SQL, {**period, "days": t.days}
    elif isinstance(t, PurchaseWindow):
        sql, params = WINDOW_SQL, {**period, "min_days": t.min_days, "max_days": t.max_days}
    elif isinstance(t, SegmentEntered):
        sql, params = SEGMENT_SQL, {**period, "segment_key": t.segment_key}
    elif isinstance(t, EventTrigger) and t.kind == "event":
        if t.event_type != "purchase":
            raise _unsupported(
                "event", f"offers stores purchases, not {t.event_type} events: only purchase triggers replay"
            )
        rows = (await session.execute(text(PURCHASES_SQL), period)).mappings()
        out = []
        for r in rows:
            event = EventMessage(
                id=r["event_id"],
                source="pos",
                event_id=r["event_id"],
                type="purchase",
                customer_id=r["customer_id"],
                occurred_at=r["occurred_at"],
                received_at=r["occurred_at"],
                properties=r["properties"],
            )
            if event_matches(t, event):
                out.append({"k": r["customer_id"], "at": r["occurred_at"], "pre": None})
        return out
    else:
        why = {
            "no_purchase_after": "offers does not store the views and carts that open its timers",
            "schedule": "offers does not keep the customer cache as it was on past dates",
            "birthday": "offers does not keep the customer cache as it was on past dates",
        }.get(t.kind, "not supported")
        raise _unsupported(t.kind, why)
    return [dict(r) for r in (await session.execute(text(sql), params)).mappings()]


async def backtest(
    *, session: AsyncSession, campaign: dict[str, Any], request: BacktestRequest, settings: Settings
) -> dict[str, Any]:
    """Evaluate the campaign's current definition over [from, to): read-only."""
    definition = CampaignDefinition.model_validate(campaign["definition"])
    active = Active(id=campaign["id"], version=campaign["version"], definition=definition)
    cands = await _candidates(session, definition, request.from_, request.to)
    evaluated: list[dict[str, Any]] = []
    if cands:
        rows = await session.execute(
            text(EVALUATE_SQL),
            {
                "camps": orjson.dumps([campaign_params(active, settings)]).decode(),
                "cands": orjson.dumps(cands, default=str).decode(),
                "gsalt": settings.global_control_salt,
                "gshare": settings.global_control_share,
                "delivery_cost": str(settings.delivery_cost),
            },
        )
        evaluated = sorted((dict(r) for r in rows.mappings()), key=lambda r: (r["k"], r["at"]))
    lim = definition.limits
    outcomes: dict[str, int] = {}
    reached: list[dict[str, Any]] = []
    last: dict[str, datetime] = {}
    seen: set[str] = set()
    for r in evaluated:
        k, at = r["k"], r["at"]
        if not r["in_audience"]:
            outcome = "not_in_audience"
        elif r["global_control"]:
            outcome = "global_control"
        elif r["pre"]:
            outcome = r["pre"]
        elif r["guarded"]:
            outcome = "economics_guard"
        elif lim.once_per_customer and k in last:
            outcome = "once_per_customer"
        elif lim.cooldown_days is not None and k in last and at - last[k] < timedelta(days=lim.cooldown_days):
            outcome = "cooldown"
        elif r["control"]:
            outcome = "control"
        else:
            outcome = "requested"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome in ("requested", "control", "global_control"):
            if outcome != "global_control":
                last[k] = at
            if k not in seen:  # a customer counts once: their first assignment
                seen.add(k)
                reached.append({"k": k, "at": at, "arm": "treated" if outcome == "requested" else outcome})
    revenue: dict[str, dict[str, Any]] = {}
    if reached:
        rows = await session.execute(
            text(REVENUE_SQL),
            {
                "rows": orjson.dumps([{"k": x["k"], "at": x["at"]} for x in reached], default=str).decode(),
                "days": definition.attribution_days,
            },
        )
        revenue = {r["k"]: dict(r) for r in rows.mappings()}
    arms: dict[str, dict[str, Any]] = {}
    for arm in ("treated", "control", "global_control"):
        rs = [x for x in reached if x["arm"] == arm]
        total = sum(float(revenue[x["k"]]["revenue"]) for x in rs)
        arms[arm] = {
            "members": len(rs),
            "converted": sum(1 for x in rs if revenue[x["k"]]["orders"] > 0),
            "revenue": round(total, 4),
            "revenue_per_member": round(total / len(rs), 4) if rs else None,
        }
    customers = [
        {
            "customer_id": x["k"],
            "at": x["at"],
            "arm": x["arm"],
            "revenue": float(revenue[x["k"]]["revenue"]),
            "orders": int(revenue[x["k"]]["orders"]),
        }
        for x in reached[:MAX_LISTED]
    ]
    return {
        "campaign_id": campaign["id"],
        "trigger": definition.trigger.kind,
        "from_": request.from_,
        "to": request.to,
        "attribution_days": definition.attribution_days,
        "evaluated": len(evaluated),
        "outcomes": outcomes,
        "arms": arms,
        "customers": customers,
        "customers_truncated": len(reached) > MAX_LISTED,
        "limits": LIMITS,
    }
