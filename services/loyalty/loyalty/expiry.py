"""The periodic sweep: reminders before expiry, expiry of lots, expiry of unmet goals. Set-based SQL only."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.ledger import load_programme
from loyalty.schemas import ProgrammeConfig
from loyalty.settings import TOPIC_LOYALTY, TOPIC_MESSAGES

_ISO = '\'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"\''


def _iso(col: str) -> str:
    return f"to_char({col} AT TIME ZONE 'UTC', {_ISO})"


# Lots whose points expire within the reminder window, not yet reminded for this expiry date, grouped
# per customer and date: one transactional message each. The message id derives from customer and date.
REMIND_SQL = f"""
WITH due AS (
    UPDATE lots SET reminded_for = expires_at
    WHERE remaining > 0 AND expires_at > :now AND expires_at <= :now + make_interval(days => CAST(:days AS int))
      AND reminded_for IS DISTINCT FROM expires_at
    RETURNING customer_id, expires_at, remaining
), per_day AS (
    SELECT customer_id, (expires_at AT TIME ZONE 'UTC')::date AS day, min(expires_at) AS first_at,
           sum(remaining) AS points
    FROM due GROUP BY customer_id, (expires_at AT TIME ZONE 'UTC')::date
)
INSERT INTO outbox (topic, key, value)
SELECT '{TOPIC_MESSAGES}', customer_id, convert_to(json_build_object(
    'id', 'loyalty:points_expiring:' || customer_id || ':' || day::text,
    'type', 'message.requested', 'customer_id', customer_id, 'occurred_at', CAST(:now_iso AS text),
    'kind', 'transactional', 'template', 'points_expiring', 'source_service', 'loyalty',
    'expires_at', {_iso("first_at")},
    'variables', json_build_object('points', points::text, 'amount', round(points * CAST(:pv AS numeric), 2)::text,
                                   'expires_on', day::text, 'expires_at', {_iso("first_at")})
)::text, 'UTF8')
FROM per_day
RETURNING 1
"""

# Lock the accounts with expiring lots first (the same lock order as every other writer), then expire in a
# second statement so it reads the lots as committed after the locks were granted.
LOCK_SQL = """
SELECT customer_id FROM accounts
WHERE customer_id IN (SELECT customer_id FROM lots WHERE remaining > 0 AND expires_at <= :now)
ORDER BY customer_id LIMIT :limit FOR UPDATE
"""

EXPIRE_SQL = f"""
WITH due AS (
    SELECT l.id, l.customer_id, l.remaining, l.expired_points, l.expires_at,
           a.balance - sum(l.remaining) OVER (PARTITION BY l.customer_id ORDER BY l.expires_at, l.id) AS balance_after
    FROM lots l JOIN accounts a ON a.customer_id = l.customer_id
    WHERE l.customer_id = ANY(CAST(:ids AS text[])) AND l.remaining > 0 AND l.expires_at <= :now
), lots_done AS (
    UPDATE lots SET remaining = 0, expired_points = lots.expired_points + due.remaining
    FROM due WHERE lots.id = due.id
), accounts_done AS (
    UPDATE accounts SET balance = accounts.balance - t.total, updated_at = :now
    FROM (SELECT customer_id, sum(remaining) AS total FROM due GROUP BY customer_id) t
    WHERE accounts.customer_id = t.customer_id
), entries AS (
    INSERT INTO ledger (ref, customer_id, kind, points, balance_after, occurred_at, recorded_at, lot_id, data)
    SELECT 'expiry:' || id || ':' || expired_points::text, customer_id, 'expiry', -remaining, balance_after,
           expires_at, :now, id, jsonb_build_object('expired_lot', id)
    FROM due
    RETURNING ref, customer_id, points, balance_after, occurred_at, lot_id
)
INSERT INTO outbox (topic, key, value)
SELECT '{TOPIC_LOYALTY}', customer_id, convert_to(json_build_object(
    'id', 'loyalty:points.expired:' || ref, 'type', 'points.expired', 'customer_id', customer_id,
    'occurred_at', {_iso("occurred_at")}, 'points', points::text, 'balance', balance_after::text,
    'data', json_build_object('lot_id', lot_id)
)::text, 'UTF8')
FROM entries
RETURNING 1
"""

EXPIRE_GOALS_SQL = f"""
WITH expired AS (
    UPDATE goals SET status = 'expired', closed_at = due_at
    WHERE status = 'active' AND due_at <= :now
    RETURNING id, customer_id, due_at, progress, target
)
INSERT INTO outbox (topic, key, value)
SELECT '{TOPIC_LOYALTY}', customer_id, convert_to(json_build_object(
    'id', 'loyalty:goal.expired:' || id, 'type', 'goal.expired', 'customer_id', customer_id,
    'occurred_at', {_iso("due_at")},
    'data', json_build_object('goal_id', id, 'progress', progress, 'target', target)
)::text, 'UTF8')
FROM expired
RETURNING 1
"""


BIRTHDAY_LOCK_SQL = """
SELECT customer_id FROM accounts
WHERE birth_date IS NOT NULL AND to_char(birth_date, 'MM-DD') = ANY(CAST(:days AS text[]))
  AND (birthday_awarded_year IS NULL OR birthday_awarded_year < CAST(:year AS int))
ORDER BY customer_id LIMIT :limit FOR UPDATE
"""

# The bonus is netted against a points debt as Book.credit does: the bonus entry, then a debt_settlement entry
# taking min(debt, bonus) from the new lot. The accounts are locked (BIRTHDAY_LOCK_SQL), so `pre` reads
# the values this statement updates.
BIRTHDAY_SQL = f"""
WITH pre AS (
    SELECT customer_id, balance, least(points_debt, CAST(:bonus AS numeric)) AS settled,
           'birthday:' || customer_id || ':' || CAST(CAST(:year AS int) AS text) AS ref
    FROM accounts WHERE customer_id = ANY(CAST(:ids AS text[]))
), acc AS (
    UPDATE accounts a SET balance = a.balance + CAST(:bonus AS numeric) - b.settled,
           points_debt = a.points_debt - b.settled, birthday_awarded_year = CAST(:year AS int), updated_at = :now
    FROM pre b WHERE a.customer_id = b.customer_id
    RETURNING a.customer_id, b.ref, b.balance + CAST(:bonus AS numeric) AS credited_balance, b.settled,
              a.balance, a.points_debt
), new_lots AS (
    INSERT INTO lots (id, customer_id, kind, earned_at, expires_at, points, remaining)
    SELECT ref, customer_id, 'birthday_bonus', :now, :expires, CAST(:bonus AS numeric),
           CAST(:bonus AS numeric) - settled
    FROM acc
), entries AS (
    INSERT INTO ledger (ref, customer_id, kind, points, debt_change, balance_after, occurred_at, recorded_at, lot_id,
                        data)
    SELECT ref, customer_id, kind, points, debt_change, balance_after, :now, :now, lot_id, data FROM (
        SELECT ref, customer_id, 'birthday_bonus' AS kind, CAST(:bonus AS numeric) AS points, 0 AS debt_change,
               credited_balance AS balance_after, ref AS lot_id, jsonb_build_object('year', CAST(:year AS int)) AS data,
               1 AS n
        FROM acc
        UNION ALL
        SELECT 'debt:' || ref, customer_id, 'debt_settlement', -settled, -settled, balance, NULL,
               jsonb_build_object('reverses', 'debt', 'settles', ref, 'lots', jsonb_build_object(ref, settled::text),
                                  'debt_after', points_debt::text), 2
        FROM acc WHERE settled > 0
    ) e ORDER BY customer_id, n
    RETURNING ref, customer_id, kind, points, balance_after, data
)
INSERT INTO outbox (topic, key, value)
SELECT '{TOPIC_LOYALTY}', customer_id, convert_to(json_build_object(
    'id', 'loyalty:' || t.type || ':' || ref, 'type', t.type, 'customer_id', customer_id,
    'occurred_at', CAST(:now_iso AS text), 'points', points::text, 'balance', balance_after::text,
    'data', CASE WHEN kind = 'birthday_bonus' THEN jsonb_build_object('kind', 'birthday_bonus') ELSE data END
)::text, 'UTF8')
FROM entries, LATERAL (SELECT CASE WHEN kind = 'birthday_bonus' THEN 'points.accrued'
                                   ELSE 'points.reversed' END AS type) t
RETURNING 1
"""


# The tier each account qualifies for by its spend in the window (accounts above base, or the given ones).
_TIER_CTE = """
WITH spend AS (
    SELECT a.customer_id, a.tier, coalesce(sum(p.paid - p.refunded), 0) AS spend
    FROM accounts a LEFT JOIN purchases p ON p.customer_id = a.customer_id AND p.occurred_at > :since
    WHERE a.tier <> 'base' AND (CAST(:ids AS text[]) IS NULL OR a.customer_id = ANY(CAST(:ids AS text[])))
    GROUP BY a.customer_id, a.tier
), target AS (
    SELECT customer_id, tier AS old_tier, spend, coalesce((
        SELECT t.name FROM unnest(CAST(:names AS text[]), CAST(:mins AS numeric[])) AS t(name, min_spend)
        WHERE t.min_spend <= spend ORDER BY t.min_spend DESC LIMIT 1), 'base') AS new_tier
    FROM spend
)
"""

TIER_CANDIDATES_SQL = (
    _TIER_CTE
    + """
SELECT customer_id FROM target WHERE new_tier <> old_tier ORDER BY customer_id LIMIT :limit
"""
)

TIER_LOCK_SQL = "SELECT customer_id FROM accounts WHERE customer_id = ANY(CAST(:ids AS text[])) ORDER BY 1 FOR UPDATE"

TIER_UPDATE_SQL = (
    _TIER_CTE
    + f"""
, changed AS (
    UPDATE accounts a SET tier = target.new_tier, updated_at = :now
    FROM target WHERE a.customer_id = target.customer_id AND target.new_tier <> target.old_tier
    RETURNING a.customer_id, target.old_tier, target.new_tier, target.spend
)
INSERT INTO outbox (topic, key, value)
SELECT '{TOPIC_LOYALTY}', customer_id, convert_to(json_build_object(
    'id', 'loyalty:tier.changed:sweep:' || customer_id || ':' || CAST(:now_iso AS text), 'type', 'tier.changed',
    'customer_id', customer_id, 'occurred_at', CAST(:now_iso AS text),
    'data', json_build_object('from', old_tier, 'to', new_tier, 'spend_12m', spend::text, 'reason', 'window')
)::text, 'UTF8')
FROM changed
RETURNING 1
"""
)


async def recompute_tiers(session: AsyncSession, now: datetime, *, programme: ProgrammeConfig, batch: int) -> int:
    """Move accounts down (or up) when purchases leave the 12-month window; publish each change."""
    params = {
        "since": now - timedelta(days=programme.tier_window_days),
        "names": [t.name for t in programme.tiers],
        "mins": [t.min_spend for t in programme.tiers],
        "now": now,
        "now_iso": now.isoformat(),
        "limit": batch,
    }
    ids = [r[0] for r in await session.execute(text(TIER_CANDIDATES_SQL), {**params, "ids": None})]
    if not ids:
        return 0
    # Lock, then recompute in a new statement: it sees purchases committed while it waited for the locks.
    await session.execute(text(TIER_LOCK_SQL), {"ids": ids})
    return len((await session.execute(text(TIER_UPDATE_SQL), {**params, "ids": ids})).all())


def _birthday_keys(today: date) -> list[str]:
    """Month-day keys celebrated today; 29 February is celebrated on the 28th in common years."""
    keys = [today.strftime("%m-%d")]
    if keys[0] == "02-28" and not calendar.isleap(today.year):
        keys.append("02-29")
    return keys


async def award_birthdays(session: AsyncSession, now: datetime, *, bonus: Decimal, expiry_days: int, batch: int) -> int:
    """Credit the birthday bonus, once a year, to accounts whose birthday is today (UTC)."""
    today = now.astimezone(UTC).date()
    ids = [
        r[0]
        for r in await session.execute(
            text(BIRTHDAY_LOCK_SQL), {"days": _birthday_keys(today), "year": today.year, "limit": batch}
        )
    ]
    if not ids:
        return 0
    params = {
        "ids": ids,
        "bonus": bonus,
        "year": today.year,
        "now": now,
        "now_iso": now.isoformat(),
        "expires": now + timedelta(days=expiry_days),
    }
    await session.execute(text(BIRTHDAY_SQL), params)
    return len(ids)


async def run_sweep(session: AsyncSession, now: datetime, *, batch: int = 5000) -> dict[str, Any]:
    """Remind, expire lots (oldest first, never below zero), expire unmet goals, birthday bonuses."""
    programme = await load_programme(session)
    params = {"now": now, "now_iso": now.isoformat()}
    reminded = 0
    if programme.reminder_days > 0:
        result = await session.execute(
            text(REMIND_SQL),
            {**params, "days": programme.reminder_days, "pv": programme.point_value},
        )
        reminded = len(result.all())
    expired = 0
    ids = [r[0] for r in await session.execute(text(LOCK_SQL), {"now": now, "limit": batch})]
    if ids:
        expired = len((await session.execute(text(EXPIRE_SQL), {**params, "ids": ids})).all())
    goals_expired = len((await session.execute(text(EXPIRE_GOALS_SQL), params)).all())
    tiers_changed = await recompute_tiers(session, now, programme=programme, batch=batch)
    birthdays = 0
    if programme.birthday_bonus > 0:
        birthdays = await award_birthdays(
            session, now, bonus=programme.birthday_bonus, expiry_days=programme.expiry_days, batch=batch
        )
    return {
        "birthday_bonuses": birthdays,
        "tiers_changed": tiers_changed,
        "reminders": reminded,
        "lots_expired": expired,
        "accounts_expired": len(ids),
        "goals_expired": goals_expired,
    }
