"""The periodic sweep: reminders before expiry, expiry of lots, expiry of unmet goals, tiers leaving the window,
birthday bonuses. Each is one set-based statement of the repository, publishing through the outbox in it; the
birthday bonus is a credit like any other (netted against a points debt), so it goes through the Book."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.ledger import Book, load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig


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
        reminded = await repo.remind_expiring(now, days=programme.reminder_days, point_value=programme.point_value)
    expired = 0
    ids = await repo.lock_expiring_accounts(now, limit=batch)
    if ids:
        expired = await repo.expire_lots(ids, now)
    goals_expired = await repo.expire_goals(now)
    tiers_changed = await repo.move_tiers(programme, now, limit=batch)
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
