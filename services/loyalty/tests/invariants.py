"""Invariants of the points debt and of the lots against the ledger, checked after every step of the tests."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# Every flow, each read from the table that causes it rather than from the account it ends in.
FLOWS_SQL = """
SELECT a.balance, a.points_debt,
       (SELECT coalesce(sum(debt_change), 0) FROM ledger WHERE customer_id = a.customer_id),
       (SELECT coalesce(sum(points) FILTER (WHERE points > 0), 0) FROM ledger WHERE customer_id = a.customer_id),
       (SELECT coalesce(-sum(points) FILTER (WHERE points < 0), 0) FROM ledger WHERE customer_id = a.customer_id),
       (SELECT coalesce(-sum(points), 0) FROM ledger WHERE customer_id = a.customer_id AND kind = 'debt_settlement'),
       (SELECT coalesce(sum(debt_change) FILTER (WHERE debt_change > 0), 0) FROM ledger
         WHERE customer_id = a.customer_id),
       (SELECT count(*) FROM ledger WHERE customer_id = a.customer_id AND (
            (kind = 'debt_settlement' AND (debt_change <> points OR points >= 0))
         OR (kind <> 'debt_settlement' AND debt_change < 0)
         OR (debt_change > 0 AND NOT (kind = 'reversal' AND data->>'reverses' IN ('accrual', 'offer_bonus'))))),
       (SELECT coalesce(sum(points), 0) FROM ledger WHERE customer_id = a.customer_id
         AND (kind IN ('accrual', 'goal_bonus', 'referral_bonus', 'welcome_bonus', 'birthday_bonus', 'offer_bonus')
              OR (kind = 'adjustment'))),
       (SELECT coalesce(sum(points_reversed), 0) FROM purchases WHERE customer_id = a.customer_id)
         + (SELECT coalesce(sum(points_reversed), 0) FROM point_offers WHERE customer_id = a.customer_id),
       (SELECT coalesce(sum(points_applied - points_returned), 0) FROM redemptions WHERE customer_id = a.customer_id),
       (SELECT coalesce(sum(expired_points), 0) FROM lots WHERE customer_id = a.customer_id),
       (SELECT coalesce(-sum(points), 0) FROM ledger WHERE customer_id = a.customer_id AND kind = 'expiry'),
       (SELECT coalesce(sum(-points + debt_change), 0) FROM ledger WHERE customer_id = a.customer_id
         AND kind = 'reversal' AND data->>'reverses' IN ('accrual', 'offer_bonus'))
FROM accounts a WHERE a.customer_id = :c
"""

# What the ledger says each lot lost (debits name the lots they took from, returns the lots they gave back to)
# against what the lot shows: points - remaining - expired_points.
LOTS_SQL = """
WITH moves AS (
    SELECT m.key AS lot_id, sum(CASE WHEN l.points > 0 THEN -CAST(m.value AS numeric) ELSE CAST(m.value AS numeric)
                                END) AS taken
    FROM ledger l, jsonb_each_text(l.data->'lots') m
    WHERE l.customer_id = :c AND l.data ? 'lots'
    GROUP BY m.key
)
SELECT coalesce(lots.id, moves.lot_id), lots.points - lots.remaining - lots.expired_points, moves.taken
FROM (SELECT * FROM lots WHERE customer_id = :c) lots FULL JOIN moves ON moves.lot_id = lots.id
"""


async def check_points_debt(
    sm: async_sessionmaker[AsyncSession], customer_id: str, *, now: datetime | None = None
) -> Decimal:
    """Debt >= 0 and == the ledger's debt changes; the flows reconcile with balance - debt; lots match the
    ledger; with `now`, nothing is spendable while in debt. Returns the debt."""
    async with sm() as s:
        row = (await s.execute(text(FLOWS_SQL), {"c": customer_id})).one()
        lots = (await s.execute(text(LOTS_SQL), {"c": customer_id})).all()
        spendable = None
        if now is not None:
            spendable = (
                await s.execute(
                    text(
                        "SELECT coalesce(sum(remaining), 0) FROM lots WHERE customer_id = :c AND remaining > 0 "
                        "AND expires_at > :now"
                    ),
                    {"c": customer_id, "now": now},
                )
            ).scalar()
    (
        bal,
        debt,
        debt_sum,
        credits,
        debits,
        settled,
        owed,
        odd_entries,
        earned,
        reversals_asked,
        redeemed_net,
        expired_in_lots,
        expired_in_ledger,
        reversals_booked,
    ) = row
    assert debt >= 0, f"negative debt {debt}"
    assert debt == debt_sum, f"debt {debt} != ledger sum of debt changes {debt_sum}"
    assert odd_entries == 0, "debt moved by an entry that may not move it"
    assert credits - debits == bal
    # The debt is what reversals could not take, less what later credits settled.
    assert owed - settled == debt
    # Settlements are not debits of the customer's points but payments of the debt: without them, the credits
    # less the debits and less everything owed is what the customer has net of what they owe.
    assert credits - (debits - settled) - owed == bal - debt, (credits, debits, settled, owed, bal, debt)
    # The same from the causes: points earned (and adjusted), less every reversal a refund asked for (taken or
    # owed), less redemptions net of their returns, less expiry.
    assert expired_in_lots == expired_in_ledger
    assert reversals_booked == reversals_asked, (reversals_booked, reversals_asked)
    assert earned - reversals_asked - redeemed_net - expired_in_ledger == bal - debt, (
        earned,
        reversals_asked,
        redeemed_net,
        expired_in_ledger,
        bal,
        debt,
    )
    for lot_id, lost, taken in lots:
        assert lost is not None, f"the ledger moves points of a lot {lot_id} the account does not have"
        assert lost == (taken or 0), f"lot {lot_id}: lost {lost}, the ledger took {taken}"
    if spendable is not None and debt > 0:
        assert spendable == 0, f"{spendable} points spendable while {debt} are owed"
    return debt
