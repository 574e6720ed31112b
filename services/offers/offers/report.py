"""The campaign report: what a campaign reached and what it earned, measured against its control.

Members are the customers a campaign assigned (its first `requested`, `control` or `global_control`
decision about them, once per customer); each assignment opens an attribution window of the
campaign's `attribution_days` from the trigger moment, for both arms alike, and the net revenue of
the orders inside it (after refunds) is the member's revenue. See the README's "Report" section.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from offers import stats
from offers.schemas import CampaignDefinition
from offers.settings import Settings

ARMS = {"requested": "treated", "control": "control", "global_control": "global_control"}

# An order's revenue net of its refunds (never below zero).
NET_REVENUE = (
    "greatest(p.revenue - coalesce((SELECT sum(r.amount) FROM refunds r "
    "WHERE r.customer_id = p.customer_id AND r.order_id = p.order_id), 0), 0)"
)

# Each member once: the first assignment, its window from the version it was made under; revenue
# and orders in (at, at + days], and the same length before it (the CUPED covariate).
MEMBERS_SQL = f"""
WITH first AS (
    SELECT DISTINCT ON (d.customer_id) d.customer_id, d.outcome, d.at, d.version
    FROM decisions d
    WHERE d.campaign_id = :c AND d.outcome IN ('requested', 'control', 'global_control')
    ORDER BY d.customer_id, d.at, d.id
),
m AS (
    SELECT f.*, coalesce(CAST(v.definition ->> 'attribution_days' AS int), :days) AS days
    FROM first f LEFT JOIN campaign_versions v ON v.campaign_id = :c AND v.version = f.version
)
SELECT m.customer_id, m.outcome, m.at, m.days,
    coalesce(post.revenue, 0) AS revenue, coalesce(post.orders, 0) AS orders, coalesce(pre.revenue, 0) AS pre_revenue
FROM m
LEFT JOIN LATERAL (
    SELECT sum(x.net) AS revenue, count(*) FILTER (WHERE x.net > 0) AS orders
    FROM (SELECT {NET_REVENUE} AS net FROM purchases p
          WHERE p.customer_id = m.customer_id AND p.occurred_at > m.at
            AND p.occurred_at <= m.at + m.days * interval '1 day') x
) post ON true
LEFT JOIN LATERAL (
    SELECT sum({NET_REVENUE}) AS revenue FROM purchases p
    WHERE p.customer_id = m.customer_id AND p.occurred_at > m.at - m.days * interval '1 day'
      AND p.occurred_at <= m.at
) pre ON true
"""

# Decisions per day of their trigger moment, with the notifier's verdicts on the requested ones.
DAILY_SQL = """
SELECT CAST(at AT TIME ZONE 'UTC' AS date) AS day,
    count(*) FILTER (WHERE outcome NOT IN ('not_in_audience', 'waiting')) AS audience,
    count(*) FILTER (WHERE outcome = 'requested') AS treated,
    count(*) FILTER (WHERE outcome = 'control') AS control,
    count(*) FILTER (WHERE outcome = 'global_control') AS global_control,
    count(*) FILTER (WHERE delivery_status IN ('sent', 'delivered', 'opened', 'clicked')) AS sent,
    count(*) FILTER (WHERE delivery_status IN ('delivered', 'opened', 'clicked')) AS delivered,
    count(*) FILTER (WHERE delivery_status IN ('opened', 'clicked')) AS opened,
    count(*) FILTER (WHERE delivery_status = 'clicked') AS clicked,
    count(*) FILTER (WHERE delivery_status = 'failed') AS failed,
    count(*) FILTER (WHERE delivery_status = 'expired') AS expired,
    coalesce(sum(delivery_cost), 0) AS channel_cost
FROM decisions WHERE campaign_id = :c GROUP BY 1 ORDER BY 1
"""

SUPPRESSED_SQL = """
SELECT CAST(at AT TIME ZONE 'UTC' AS date) AS day, coalesce(delivery_reason, 'unknown') AS reason, count(*) AS n
FROM decisions WHERE campaign_id = :c AND delivery_status = 'suppressed' GROUP BY 1, 2 ORDER BY 1, 2
"""


async def coupon_redemptions_of(session: AsyncSession, campaign_id: str) -> dict[str, Any]:
    """Redemptions of the campaign's coupons and the discount they gave, from `coupon_redemptions`;
    a rolled-back redemption counts for nothing."""
    row = (
        await session.execute(
            text(
                "SELECT count(*) AS n, coalesce(sum(discount), 0) AS discount FROM coupon_redemptions "
                "WHERE campaign_id = :c AND rolled_back_at IS NULL"
            ),
            {"c": campaign_id},
        )
    ).one()
    return {"redemptions": int(row.n), "discount": Decimal(str(row.discount))}


async def campaign_points_of(session: AsyncSession, campaign_id: str) -> dict[str, Any]:
    """Bonus points loyalty awarded for the campaign (net of reversals) and their money value,
    from `campaign_points`."""
    row = (
        await session.execute(
            text(
                "SELECT coalesce(sum(points), 0) AS points, coalesce(sum(value), 0) AS value FROM campaign_points "
                "WHERE campaign_id = :c"
            ),
            {"c": campaign_id},
        )
    ).one()
    return {"points": Decimal(str(row.points)), "value": Decimal(str(row.value))}


class IntervalRead(BaseModel):
    estimate: float
    low: float
    high: float
    se: float | None = None
    df: float | None = None


class ArmRead(BaseModel):
    members: int
    converted: int
    conversion_rate: float | None
    revenue: float
    revenue_per_member: float | None
    cap: float | None
    revenue_per_member_capped: float | None
    pre_revenue_per_member: float | None


class SampleRatioRead(BaseModel):
    expected_control_share: float
    observed_control_share: float | None
    chi2: float | None
    p_value: float | None
    mismatch: bool


class DayRead(BaseModel):
    day: date
    audience: int
    treated: int
    control: int
    global_control: int
    sent: int
    delivered: int
    opened: int
    clicked: int
    failed: int
    expired: int
    suppressed: dict[str, int]
    members: dict[str, int]
    conversion_rate: dict[str, float | None]
    revenue_per_member: dict[str, float | None]


class CostRead(BaseModel):
    discounts: float
    redemptions: int
    channel: float
    points: float
    points_value: float
    total: float


class ReportRead(BaseModel):
    campaign_id: str
    name: str
    state: str
    version: int
    attribution_days: int
    control_share: float
    cap_percentile: float
    cuped: bool
    cuped_theta: float | None
    margin_rate: float
    min_sample_per_arm: int
    arms: dict[str, ArmRead]
    delivery: dict[str, Any]
    incremental_revenue_per_member: IntervalRead | None
    incremental_revenue: IntervalRead | None
    relative_lift: IntervalRead | None
    conversion_rate_difference: IntervalRead | None
    incremental_revenue_vs_global_control: IntervalRead | None
    cost: CostRead
    incremental_margin: IntervalRead | None
    roi: IntervalRead | None
    sample_ratio: SampleRatioRead | None
    warnings: list[str]
    series: list[DayRead]


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _interval(iv: stats.Interval | None, scale: float = 1.0, shift: float = 0.0) -> dict[str, Any] | None:
    """An interval, optionally mapped by x * scale + shift (a positive scale keeps low <= high)."""
    if iv is None:
        return None
    return {
        "estimate": round(iv.estimate * scale + shift, 4),
        "low": round(iv.low * scale + shift, 4),
        "high": round(iv.high * scale + shift, 4),
        "se": round(iv.se * abs(scale), 6),
        "df": round(iv.df, 3),
    }


def _arm(rows: list[dict[str, Any]], capped_values: list[float], cap: float | None) -> dict[str, Any]:
    n = len(rows)
    converted = sum(1 for r in rows if r["orders"] > 0)
    revenue = sum(r["revenue"] for r in rows)
    return {
        "members": n,
        "converted": converted,
        "conversion_rate": _r(converted / n, 6) if n else None,
        "revenue": round(revenue, 4),
        "revenue_per_member": _r(revenue / n) if n else None,
        "cap": _r(cap),
        "revenue_per_member_capped": _r(sum(capped_values) / n) if n else None,
        "pre_revenue_per_member": _r(sum(r["pre_revenue"] for r in rows) / n) if n else None,
    }


def _series(daily: list[Any], suppressed: list[Any], members: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    days: dict[date, dict[str, Any]] = {}
    for d in daily:
        days[d.day] = {"day": d.day, "suppressed": {}, **{k: int(getattr(d, k)) for k in _DAY_COUNTS}}
    for s in suppressed:
        days[s.day]["suppressed"][s.reason] = int(s.n)
    per: dict[date, dict[str, list[dict[str, Any]]]] = {}
    for arm, rows in members.items():
        for r in rows:
            per.setdefault(r["at"].date(), {a: [] for a in members})[arm].append(r)
    out = []
    for day in sorted(days):
        arms = per.get(day, {a: [] for a in members})
        out.append(
            {
                **days[day],
                "members": {a: len(rs) for a, rs in arms.items()},
                "conversion_rate": {
                    a: _r(sum(1 for r in rs if r["orders"] > 0) / len(rs), 6) if rs else None for a, rs in arms.items()
                },
                "revenue_per_member": {
                    a: _r(sum(r["revenue"] for r in rs) / len(rs)) if rs else None for a, rs in arms.items()
                },
            }
        )
    return out


_DAY_COUNTS = (
    "audience",
    "treated",
    "control",
    "global_control",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "failed",
    "expired",
)


async def campaign_report(
    *,
    session: AsyncSession,
    campaign: dict[str, Any],
    settings: Settings,
    cuped: bool = False,
    cap_percentile: float | None = None,
    margin_rate: float | None = None,
) -> dict[str, Any]:
    """Every figure of the report (see the README's "Report" section for how each is computed)."""
    definition = CampaignDefinition.model_validate(campaign["definition"])
    cid = campaign["id"]
    q = settings.report_cap_percentile if cap_percentile is None else cap_percentile
    margin = settings.report_margin_rate if margin_rate is None else margin_rate
    control_share = definition.control_share if definition.control_share is not None else settings.default_control_share
    raw = (await session.execute(text(MEMBERS_SQL), {"c": cid, "days": definition.attribution_days})).mappings()
    members: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS.values()}
    for r in raw:
        members[ARMS[r["outcome"]]].append(
            {
                "at": r["at"],
                "revenue": float(r["revenue"]),
                "orders": int(r["orders"]),
                "pre_revenue": float(r["pre_revenue"]),
            }
        )
    capped: dict[str, list[float]] = {}
    caps: dict[str, float | None] = {}
    pre_capped: dict[str, list[float]] = {}
    for arm, rows in members.items():
        capped[arm], caps[arm] = stats.capped([r["revenue"] for r in rows], q)
        pre_capped[arm], _ = stats.capped([r["pre_revenue"] for r in rows], q)
    y_t, y_c = capped["treated"], capped["control"]
    theta = None
    if cuped:
        y_t, y_c, theta = stats.cuped(y_t, pre_capped["treated"], y_c, pre_capped["control"])
    n_t, n_c = len(y_t), len(y_c)
    per_member = stats.welch(y_t, y_c)
    lift = stats.relative_lift(y_t, y_c)
    conv = stats.welch(
        [1.0 if r["orders"] > 0 else 0.0 for r in members["treated"]],
        [1.0 if r["orders"] > 0 else 0.0 for r in members["control"]],
    )
    vs_global = stats.welch(capped["treated"], capped["global_control"])

    daily = list(await session.execute(text(DAILY_SQL), {"c": cid}))
    suppressed = list(await session.execute(text(SUPPRESSED_SQL), {"c": cid}))
    coupons = await coupon_redemptions_of(session, cid)
    points = await campaign_points_of(session, cid)
    channel_cost = float(sum((Decimal(str(d.channel_cost)) for d in daily), Decimal(0)))
    discounts = float(coupons["discount"])
    total_cost = discounts + channel_cost + float(points["value"])

    incremental = _interval(per_member, scale=float(n_t))
    inc_margin = _interval(per_member, scale=float(n_t) * margin, shift=-total_cost) if per_member else None
    roi = (
        _interval(per_member, scale=float(n_t) * margin / total_cost, shift=-1.0)
        if per_member and total_cost > 0
        else None
    )

    warnings: list[str] = []
    minimum = settings.report_min_sample_per_arm
    for arm, n in (("treated", n_t), ("control", n_c)):
        if n < minimum:
            warnings.append(f"only {n} {arm} members (fewer than {minimum}): the intervals are not to be trusted yet")
    srm = None
    test = stats.sample_ratio(n_t, n_c, control_share)
    if test is not None:
        chi2, p = test
        srm = {
            "expected_control_share": control_share,
            "observed_control_share": _r(n_c / (n_t + n_c), 6),
            "chi2": _r(chi2),
            "p_value": p,
            "mismatch": p < 0.001,
        }
        if p < 0.001:
            warnings.append(
                f"sample ratio mismatch: control share {n_c / (n_t + n_c):.4f} against the configured "
                f"{control_share} (chi-square p = {p:.2g}): the split is broken, the comparison is not fair"
            )
    if per_member is None:
        warnings.append("fewer than two members in the treated or the control arm: no interval")
    series = _series(daily, suppressed, members)
    delivery: dict[str, Any] = {
        k: sum(d[k] for d in series) for k in ("sent", "delivered", "opened", "clicked", "failed", "expired")
    }
    reasons: dict[str, int] = {}
    for d in series:
        for reason, n in d["suppressed"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    delivery["suppressed"] = reasons
    return {
        "campaign_id": cid,
        "name": campaign["name"],
        "state": campaign["state"],
        "version": campaign["version"],
        "attribution_days": definition.attribution_days,
        "control_share": control_share,
        "cap_percentile": q,
        "cuped": cuped,
        "cuped_theta": _r(theta, 6),
        "margin_rate": margin,
        "min_sample_per_arm": minimum,
        "arms": {arm: _arm(rows, capped[arm], caps[arm]) for arm, rows in members.items()},
        "delivery": delivery,
        "incremental_revenue_per_member": _interval(per_member),
        "incremental_revenue": incremental,
        "relative_lift": _interval(lift),
        "conversion_rate_difference": _interval(conv),
        "incremental_revenue_vs_global_control": _interval(vs_global, scale=float(n_t)),
        "cost": {
            "discounts": round(discounts, 4),
            "redemptions": coupons["redemptions"],
            "channel": round(channel_cost, 4),
            "points": float(points["points"]),
            "points_value": float(points["value"]),
            "total": round(total_cost, 4),
        },
        "incremental_margin": inc_margin,
        "roi": roi,
        "sample_ratio": srm,
        "warnings": warnings,
        "series": series,
    }
