"""The periodic sweep: reminders before expiry, expiry of lots, expiry of unmet goals, tiers leaving the window,
birthday bonuses. The statements are set-based (in the repository); the birthday bonus is a credit like any
other, so it goes through the Book."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import LoyaltyEvent, MessageRequested
from loyalty.ledger import Book, load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig
from loyalty.settings import TOPIC_LOYALTY, TOPIC_MESSAGES


async def remind_expiring(repo: LoyaltyRepository, now: datetime, *, programme: ProgrammeConfig) -> int:
    """One `points_expiring` message per customer and day on which points expire within `reminder_days`, once."""
    requests = [
        MessageRequested(
            # The id derives from customer and date: a reminder is never sent twice for one expiry date.
            id=f"loyalty:points_expiring:{r.customer_id}:{r.day.isoformat()}",
            customer_id=r.customer_id,
            occurred_at=now,
            kind="transactional",
            template="points_expiring",
            source_service="loyalty",
            expires_at=r.first_at,
            variables={
                "points": str(r.points),
                "amount": str((r.points * programme.point_value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)),
                "expires_on": r.day.isoformat(),
                "expires_at": r.first_at.astimezone(UTC).isoformat(),
            },
        )
        for r in await repo.mark_reminders(now, days=programme.reminder_days)
    ]
    await repo.enqueue(TOPIC_MESSAGES, requests)
    return len(requests)


async def expire_goals(repo: LoyaltyRepository, now: datetime) -> int:
    """Close the active goals past their due date, each published as `goal.expired`."""
    events = [
        LoyaltyEvent(
            id=f"loyalty:goal.expired:{g.id}",
            type="goal.expired",
            customer_id=g.customer_id,
            occurred_at=g.due_at,
            data={"goal_id": g.id, "progress": g.progress, "target": g.target},
        )
        for g in await repo.expire_goals(now)
    ]
    await repo.enqueue(TOPIC_LOYALTY, events)
    return len(events)


async def recompute_tiers(session: AsyncSession, now: datetime, *, programme: ProgrammeConfig, batch: int) -> int:
    """Move accounts down (or up) when purchases leave the tier window; publish each change."""
    repo = LoyaltyRepository(session)
    events = [
        LoyaltyEvent(
            id=f"loyalty:tier.changed:sweep:{c.customer_id}:{now.isoformat()}",
            type="tier.changed",
            customer_id=c.customer_id,
            occurred_at=now,
            data={"from": c.old_tier, "to": c.new_tier, "spend_12m": str(c.spend), "reason": "window"},
        )
        for c in await repo.move_tiers(programme, now, limit=batch)
    ]
    await repo.enqueue(TOPIC_LOYALTY, events)
    return len(events)


def _birthday_keys(today: date) -> list[str]:
    """Month-day keys celebrated today; 29 February is celebrated on the 28th in common years."""
    keys = [today.strftime("%m-%d")]
    if keys[0] == "02-28" and not calendar.isleap(today.year):
        keys.append("02-29")
    return keys


async def award_birthdays(session: AsyncSession, now: datetime, *, programme: ProgrammeConfig, batch: int) -> int:
    """Credit the birthday bonus, once a year, to accounts whose birthday is today (UTC)."""
    today = now.astimezone(UTC).date()
    book = Book(session, programme, now)
    ids = await book.repo.lock_birthdays(_birthday_keys(today), today.year, limit=batch)
    if not ids:
        return 0
    for acct in (await book.open(ids, create=False)).values():
        acct.birthday_awarded_year = today.year
        acct.dirty = True
        book.credit(
            acct,
            kind="birthday_bonus",
            points=programme.birthday_bonus,
            ref=f"birthday:{acct.customer_id}:{today.year}",
            at=now,
            data={"year": today.year},
            event_type="points.accrued",
        )
    await book.flush()
    return len(ids)


async def run_sweep(session: AsyncSession, now: datetime, *, batch: int = 5000) -> dict[str, Any]:
    """Remind, expire lots (oldest first, never below zero), expire unmet goals, move tiers, birthday bonuses."""
    programme = await load_programme(session)
    repo = LoyaltyRepository(session)
    reminded = 0
    if programme.reminder_days > 0:
        reminded = await remind_expiring(repo, now, programme=programme)
    expired = 0
    ids = await repo.lock_expiring_accounts(now, limit=batch)
    if ids:
        expired = await repo.expire_lots(ids, now)
    goals_expired = await expire_goals(repo, now)
    tiers_changed = await recompute_tiers(session, now, programme=programme, batch=batch)
    birthdays = 0
    if programme.birthday_bonus > 0:
        birthdays = await award_birthdays(session, now, programme=programme, batch=batch)
    return {
        "birthday_bonuses": birthdays,
        "tiers_changed": tiers_changed,
        "reminders": reminded,
        "lots_expired": expired,
        "accounts_expired": len(ids),
        "goals_expired": goals_expired,
    }
