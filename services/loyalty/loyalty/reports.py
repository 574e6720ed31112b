"""Programme reports: points issued, redeemed, expired and outstanding liability by month; rates."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.ledger import load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import MonthReport, ProgrammeReport


def _rate(part: Decimal | int, whole: Decimal | int) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"))


async def programme_report(
    *, session: AsyncSession, since: date | None = None, until: date | None = None
) -> ProgrammeReport:
    """Monthly points flows and liability (points and money), redemption and repeat-purchase rates."""
    programme = await load_programme(session)
    repo = LoyaltyRepository(session)
    months = []
    for m in await repo.monthly_flows():
        if (since and m.month < since.replace(day=1)) or (until and m.month > until):
            continue
        months.append(
            MonthReport(
                month=m.month,
                issued=m.issued,
                reversed=m.reversed,
                redeemed=m.redeemed,
                expired=m.expired,
                adjusted=m.adjusted,
                liability_points=m.liability,
                liability_money=(m.liability * programme.point_value).quantize(Decimal("0.01")),
            )
        )
    issued_total = sum((m.issued - m.reversed for m in months), Decimal(0))
    redeemed_total = sum((m.redeemed for m in months), Decimal(0))
    members = await repo.members()
    return ProgrammeReport(
        months=months,
        issued_total=issued_total,
        redeemed_total=redeemed_total,
        redemption_rate=_rate(redeemed_total, issued_total),
        members=members.members,
        purchasing_members=members.purchasing,
        repeat_purchasing_members=members.repeat_purchasing,
        repeat_purchase_rate=_rate(members.repeat_purchasing, members.purchasing),
    )
