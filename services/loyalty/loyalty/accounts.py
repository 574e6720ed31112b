"""Reading an account: balance, tier, lots with expiry, goals, ledger pages, referral code."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.errors import AccountNotFound
from loyalty.ledger import load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import AccountRead, LedgerPage, ReferralRead


async def get_account(*, session: AsyncSession, customer_id: str, now: datetime) -> AccountRead:
    """The account with its open lots (oldest first) and recent goals."""
    repo = LoyaltyRepository(session)
    acct = await repo.get_account(customer_id)
    if acct is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    programme = await load_programme(session)
    spend = (await repo.spend_since([customer_id], now - timedelta(days=programme.tier_window_days))).get(
        customer_id, Decimal(0)
    )
    return AccountRead(
        customer_id=acct.customer_id,
        balance=acct.balance,
        balance_value=(acct.balance * programme.point_value).quantize(Decimal("0.01")),
        points_debt=acct.points_debt,
        tier=acct.tier,
        spend_12m=spend,
        referral_code=acct.referral_code,
        referred_by=acct.referred_by,
        purchases_count=acct.purchases_count,
        created_at=acct.created_at,
        lots=await repo.list_lots(customer_id, open_only=True),
        goals=await repo.goals_of(customer_id),
    )


async def get_ledger(*, session: AsyncSession, customer_id: str, before: int | None, limit: int) -> LedgerPage:
    """A page of the account's ledger, newest first."""
    repo = LoyaltyRepository(session)
    if await repo.get_account(customer_id) is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    entries = await repo.ledger_page(customer_id, before=before, limit=limit)
    return LedgerPage(
        customer_id=customer_id,
        entries=entries,
        next_before=entries[-1].seq if len(entries) == limit else None,
    )


async def get_referral(*, session: AsyncSession, customer_id: str) -> ReferralRead:
    acct = await LoyaltyRepository(session).get_account(customer_id)
    if acct is None:
        raise AccountNotFound(f"no loyalty account for customer {customer_id!r}")
    return ReferralRead(
        customer_id=acct.customer_id,
        referral_code=acct.referral_code,
        referred_by=acct.referred_by,
        referral_rewarded=acct.referral_rewarded,
    )
