"""Programme reports: points issued, redeemed, expired and outstanding liability by month; rates."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.ledger import load_programme
from loyalty.schemas import MonthReport, ProgrammeReport

MONTHS_SQL = """
WITH m AS (
    SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
           coalesce(sum(points) FILTER (WHERE kind IN ('accrual', 'goal_bonus', 'referral_bonus', 'welcome_bonus',
                                                       'birthday_bonus')), 0) AS issued,
           coalesce(-sum(points) FILTER (WHERE (kind = 'reversal' AND data->>'reverses' = 'accrual')
                                               OR kind = 'debt_settlement'), 0) AS reversed,
           coalesce(-sum(points) FILTER (WHERE kind = 'redemption'), 0)
             - coalesce(sum(points) FILTER (WHERE kind = 'reversal' AND data->>'reverses' = 'redemption'), 0)
             AS redeemed,
           coalesce(-sum(points) FILTER (WHERE kind = 'expiry'), 0) AS expired,
           coalesce(sum(points) FILTER (WHERE kind = 'adjustment'), 0) AS adjusted,
           sum(points) AS net
    FROM ledger GROUP BY 1
)
SELECT month, issued, reversed, redeemed, expired, adjusted, sum(net) OVER (ORDER BY month) AS liability
FROM m ORDER BY month
"""

MEMBERS_SQL = """
SELECT count(*), count(*) FILTER (WHERE purchases_count >= 1), count(*) FILTER (WHERE purchases_count >= 2)
FROM accounts
"""


def _rate(part: Decimal | int, whole: Decimal | int) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"))


async def programme_report(
    *, session: AsyncSession, since: date | None = None, until: date | None = None
) -> ProgrammeReport:
    """Monthly points flows and liability (points and money), redemption and repeat-purchase rates."""
    programme = await load_programme(session)
    months = []
    for row in await session.execute(text(MONTHS_SQL)):
        month, issued, reversed_, redeemed, expired, adjusted, liability = row
        if (since and month < since.replace(day=1)) or (until and month > until):
            continue
        months.append(
            MonthReport(
                month=month,
                issued=issued,
                reversed=reversed_,
                redeemed=redeemed,
                expired=expired,
                adjusted=adjusted,
                liability_points=liability,
                liability_money=(liability * programme.point_value).quantize(Decimal("0.01")),
            )
        )
    issued_total = sum((m.issued - m.reversed for m in months), Decimal(0))
    redeemed_total = sum((m.redeemed for m in months), Decimal(0))
    members, buyers, repeat = (await session.execute(text(MEMBERS_SQL))).one()
    return ProgrammeReport(
        months=months,
        issued_total=issued_total,
        redeemed_total=redeemed_total,
        redemption_rate=_rate(redeemed_total, issued_total),
        members=members,
        purchasing_members=buyers,
        repeat_purchasing_members=repeat,
        repeat_purchase_rate=_rate(repeat, buyers),
    )
