"""Reading an account: balance, tier, lots with expiry, goals, ledger pages, referral code."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.errors import AccountNotFound
from loyalty.ledger import load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import (
    AccountRead,
    GoalRead,
    LedgerEntryRead,
    LedgerPage,
    LotRead,
    ReferralRead,
)


async def get_account(*, session: AsyncSession, customer_id: str, now: datetime) -> AccountRead:
    """The account with its open lots (oldest first) and recent goals."""
    repo = LoyaltyRepository(session)
    row = await repo.get_account(customer_id)
    if row is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    programme = await load_programme(session)
    spend = (await repo.spend_since([customer_id], now - timedelta(days=programme.tier_window_days))).get(
        customer_id, Decimal(0)
    )
    lots = [
        LotRead(
            id=r[0],
            kind=r[2],
            earned_at=r[3],
            expires_at=r[4],
            points=r[5],
            remaining=r[6],
            expired_points=r[7],
        )
        for r in await repo.list_lots(customer_id, open_only=True)
    ]
    goals = [
        GoalRead(
            id=g[0],
            segment_key=g[2],
            target=g[3],
            progress=g[4],
            reward=g[5],
            status=g[6],
            assigned_at=g[7],
            due_at=g[8],
            closed_at=g[9],
        )
        for g in await repo.goals_of(customer_id)
    ]
    return AccountRead(
        customer_id=row[0],
        balance=row[1],
        balance_value=(row[1] * programme.point_value).quantize(Decimal("0.01")),
        points_debt=row[11],
        tier=row[2],
        spend_12m=spend,
        referral_code=row[3],
        referred_by=row[4],
        purchases_count=row[6],
        created_at=row[10],
        lots=lots,
        goals=goals,
    )


async def get_ledger(*, session: AsyncSession, customer_id: str, before: int | None, limit: int) -> LedgerPage:
    """A page of the account's ledger, newest first."""
    repo = LoyaltyRepository(session)
    if await repo.get_account(customer_id) is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    rows = await repo.ledger_page(customer_id, before=before, limit=limit)
    entries = [
        LedgerEntryRead(
            seq=r[0],
            ref=r[1],
            kind=r[2],
            points=r[3],
            balance_after=r[4],
            occurred_at=r[5],
            recorded_at=r[6],
            lot_id=r[7],
            order_id=r[8],
            redemption_id=r[9],
            data=r[10],
            debt_change=r[11],
        )
        for r in rows
    ]
    return LedgerPage(
        customer_id=customer_id,
        entries=entries,
        next_before=entries[-1].seq if len(entries) == limit else None,
    )


async def get_referral(*, session: AsyncSession, customer_id: str) -> ReferralRead:
    row = await LoyaltyRepository(session).get_account(customer_id)
    if row is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    return ReferralRead(customer_id=row[0], referral_code=row[3], referred_by=row[4], referral_rewarded=row[5])
