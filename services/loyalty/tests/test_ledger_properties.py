"""Property test: random sequences of purchases, refunds, redemptions (with retries), sweeps and adjustments.

After every step: balance == ledger sum == open lots, never negative, lots within bounds and matching the
ledger's movements of each lot, the points debt >= 0 and == the ledger's debt changes, nothing spendable while in
debt, credits - debits reconciling with balance - debt, and every effect (accrual per order, redemption per id,
adjustment per id, returns per redemption) applied exactly once.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from loyalty import adjustments, expiry, redemptions
from loyalty.errors import IdempotencyConflict, InsufficientPoints, RedemptionNotCancellable
from loyalty.ledger import load_programme
from loyalty.schemas import AdjustmentCreate, RedemptionCreate

from . import factories as f
from .conftest import apply, check_invariants, set_programme
from .invariants import check_points_debt

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
money = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("400"), places=2)
points = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("5000"), places=2)

ops = st.one_of(
    st.tuples(st.just("purchase"), money, st.booleans()),
    st.tuples(st.just("resend_purchase"), st.integers(0, 20)),
    st.tuples(st.just("refund"), st.integers(0, 20), money),
    st.tuples(st.just("refund_in_full"), st.integers(0, 20)),
    st.tuples(st.just("spend_then_refund"), money, money),
    st.tuples(st.just("redeem"), money, st.none() | points),
    st.tuples(st.just("retry_redeem"), st.integers(0, 20)),
    st.tuples(st.just("conflicting_redeem"), st.integers(0, 20)),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("sweep"), st.integers(0, 200)),
    st.tuples(st.just("adjust"), st.decimals(min_value=-2000, max_value=2000, places=2).filter(lambda d: d != 0)),
)
_run = itertools.count()


async def _check_exactly_once(sm: Any, customer_id: str, orders: list, redeemed: list, adjusted: list) -> None:
    async with sm() as s:

        def q(sql: str, **kw: Any) -> Any:
            return s.execute(text(sql), {"c": customer_id, **kw})

        accruals = dict(
            (
                await q(
                    "SELECT order_id, count(*) FROM ledger WHERE customer_id = :c AND kind = 'accrual' GROUP BY order_id"
                )
            ).all()
        )
        assert all(n == 1 for n in accruals.values())
        assert (await q("SELECT count(*) FROM purchases WHERE customer_id = :c")).scalar() == len(orders)
        accrued = (await q("SELECT coalesce(sum(points_accrued), 0) FROM purchases WHERE customer_id = :c")).scalar()
        ledger_accrued = (
            await q("SELECT coalesce(sum(points), 0) FROM ledger WHERE customer_id = :c AND kind = 'accrual'")
        ).scalar()
        assert accrued == ledger_accrued
        applied, returned = (
            await q(
                "SELECT coalesce(sum(points_applied), 0), coalesce(sum(points_returned), 0) FROM redemptions "
                "WHERE customer_id = :c"
            )
        ).one()
        ledger_redeemed = (
            await q("SELECT coalesce(sum(points), 0) FROM ledger WHERE customer_id = :c AND kind = 'redemption'")
        ).scalar()
        ledger_returned = (
            await q(
                "SELECT coalesce(sum(points), 0) FROM ledger WHERE customer_id = :c AND kind = 'reversal' "
                "AND data->>'reverses' = 'redemption'"
            )
        ).scalar()
        assert -ledger_redeemed == applied and ledger_returned == returned and returned <= applied
        for rid, _, _ in redeemed:
            n = (await q("SELECT count(*) FROM ledger WHERE ref = :r", r=f"redemption:{rid}")).scalar()
            assert n == 1, rid
        for aid in adjusted:
            assert (await q("SELECT count(*) FROM ledger WHERE ref = :r", r=f"adjustment:{aid}")).scalar() == 1
        allocated = (
            await q(
                "SELECT coalesce(sum(rl.points - rl.returned), 0) FROM redemption_lots rl JOIN redemptions r "
                "USING (redemption_id) WHERE r.customer_id = :c"
            )
        ).scalar()
        assert allocated == applied - returned


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(ops, min_size=1, max_size=25))
async def test_random_sequences_keep_the_ledger_consistent(db, steps):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    run = next(_run)
    cid = f"p{run}"
    now = T0 + timedelta(days=1000 * run)  # each example lives in its own time, sweeps do not interfere
    orders: list[dict[str, Any]] = []
    redeemed: list[tuple[str, dict[str, Any], str]] = []  # (id, body, state: open/used/cancelled)
    adjusted: list[str] = []
    await apply(sm, now, f.customer_updated(cid, now))

    async def redeem(n: int, check_amount: Decimal, points: Decimal | None) -> None:
        body = {"redemption_id": f"{cid}-r{n}", "customer_id": cid, "check_amount": check_amount, "points": points}
        try:
            async with sm() as s:
                await redemptions.redeem(
                    session=s, programme=await load_programme(s), redemption_in=RedemptionCreate(**body), now=now
                )
                await s.commit()
            redeemed.append((body["redemption_id"], body, "open"))
        except InsufficientPoints:
            pass

    for n, step in enumerate(steps):
        kind = step[0]
        if kind == "purchase":
            _, total, with_redemption = step
            rid = None
            open_ = [r for r in redeemed if r[2] == "open"]
            if with_redemption and open_:
                rid = open_[-1][0]
                redeemed[redeemed.index(open_[-1])] = (rid, open_[-1][1], "used")
            event = f.purchase(cid, f"o{n}", total, now, redemption_id=rid)
            orders.append(event)
            await apply(sm, now, event)
        elif kind == "resend_purchase" and orders:
            again = dict(orders[step[1] % len(orders)])
            again["id"] = again["id"] + ":resent"  # another message id, same order
            await apply(sm, now, again)
        elif kind == "refund" and orders:
            order = orders[step[1] % len(orders)]
            await apply(sm, now, f.refund(cid, order["properties"]["order_id"], step[2], now))
        elif kind == "refund_in_full" and orders:
            # After its points were spent, a full refund is what makes the reversal exceed the balance.
            order = orders[step[1] % len(orders)]
            await apply(sm, now, f.refund(cid, order["properties"]["order_id"], order["properties"]["total"], now))
        elif kind == "spend_then_refund":
            # The points of a purchase spent, then the purchase refunded: the reversal exceeds the balance.
            event = f.purchase(cid, f"o{n}", step[1], now)
            orders.append(event)
            await apply(sm, now, event)
            await redeem(n, step[2], None)
            await apply(sm, now, f.refund(cid, f"o{n}", step[1], now))
        elif kind == "redeem":
            await redeem(n, step[1], step[2])
        elif kind in ("retry_redeem", "conflicting_redeem") and redeemed:
            rid, body, _ = redeemed[step[1] % len(redeemed)]
            if kind == "conflicting_redeem":
                body = {**body, "check_amount": body["check_amount"] + 1}
            async with sm() as s:
                try:
                    _, created = await redemptions.redeem(
                        session=s, programme=await load_programme(s), redemption_in=RedemptionCreate(**body), now=now
                    )
                    assert kind == "retry_redeem" and not created
                except IdempotencyConflict:
                    assert kind == "conflicting_redeem"
                await s.commit()
        elif kind == "cancel" and redeemed:
            i = step[1] % len(redeemed)
            rid, body, state = redeemed[i]
            async with sm() as s:
                try:
                    await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id=rid, now=now)
                    await s.commit()
                    assert state != "used"
                    redeemed[i] = (rid, body, "cancelled")
                except RedemptionNotCancellable:
                    assert state == "used"
        elif kind == "sweep":
            now += timedelta(days=step[1])
            async with sm() as s:
                await expiry.run_sweep(s, now)
                await s.commit()
        elif kind == "adjust":
            aid = f"{cid}-a{n}"
            try:
                async with sm() as s:
                    await adjustments.adjust(
                        session=s,
                        programme=await load_programme(s),
                        customer_id=cid,
                        now=now,
                        adjustment_in=AdjustmentCreate(adjustment_id=aid, points=step[1], reason="test"),
                    )
                    await s.commit()
                adjusted.append(aid)
            except InsufficientPoints:
                assert step[1] < 0
        await check_invariants(sm, cid)
        await check_points_debt(sm, cid, now=now)
        await _check_exactly_once(sm, cid, orders, redeemed, adjusted)
