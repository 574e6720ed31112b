"""Domain rules of the ledger, called directly with a session against a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from loyalty import adjustments, expiry, redemptions, reports
from loyalty.errors import IdempotencyConflict, InsufficientPoints, RedemptionNotCancellable
from loyalty.ledger import Book, load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import AdjustmentCreate, RedemptionCreate

from . import factories as f
from .conftest import apply, balance, check_invariants, ledger, outbox, set_programme

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
D = Decimal


async def redeem(sm, now, **body):
    async with sm() as s:
        result = await redemptions.redeem(
            session=s, programme=await load_programme(s), redemption_in=RedemptionCreate(**body), now=now
        )
        await s.commit()
    return result


async def adjust(sm, now, customer_id, adjustment_id, points, reason="goodwill"):
    async with sm() as s:
        result = await adjustments.adjust(
            session=s,
            programme=await load_programme(s),
            customer_id=customer_id,
            now=now,
            adjustment_in=AdjustmentCreate(adjustment_id=adjustment_id, points=D(points), reason=reason),
        )
        await s.commit()
    return result


async def sweep(sm, now):
    async with sm() as s:
        result = await expiry.run_sweep(s, now)
        await s.commit()
    return result


async def test_first_event_creates_account_and_purchase_accrues_base_rate(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.customer_updated("c1", T0, first_name="Ann"))
    assert await balance(sm, "c1") == 0
    await apply(sm, T0, f.purchase("c1", "o1", "20.00", T0))
    # 1% of 20.00 = 0.20 money = 20 points at 0.01 per point
    assert await balance(sm, "c1") == D("20.00")
    assert [k for k, _, _ in await ledger(sm, "c1")] == ["accrual"]
    await check_invariants(sm, "c1")


async def test_same_order_under_another_event_id_accrues_once(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "50", T0), f.purchase("c1", "o1", "50", T0))
    await apply(sm, T0, f.purchase("c1", "o1", "50", T0))
    assert await balance(sm, "c1") == D("50.00")


async def test_category_multiplier_and_exclusion_weight_the_paid_amount(db):
    _, sm = db
    await set_programme(
        sm, {**f.SCENARIO4_PROGRAMME, "category_multipliers": {"wine": "2"}, "excluded_categories": ["tobacco"]}, T0
    )
    items = [
        {"sku": "a", "category": "wine", "quantity": "1", "unit_price": "10"},
        {"sku": "b", "category": "tobacco", "quantity": "1", "unit_price": "10"},
        {"sku": "c", "category": "bread", "quantity": "2", "unit_price": "5", "discount": "0"},
    ]
    await apply(sm, T0, f.purchase("c1", "o1", "30", T0, items=items))
    # eligible = 10*2 + 0 + 10*1 = 30 of 30 gross -> share 1 -> 0.30 money -> 30 points
    assert await balance(sm, "c1") == D("30.00")


async def test_top_tier_by_12_month_spend_earns_3_percent_and_tier_change_is_published(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "900", T0))
    assert await balance(sm, "c1") == D("900.00")  # base 1%
    await apply(sm, T0, f.purchase("c1", "o2", "100", T0 + timedelta(days=1)))
    # spend reaches 1000: top tier, 3% of 100 = 3.00 money = 300 points
    assert await balance(sm, "c1") == D("1200.00")
    changes = [m for m in await outbox(sm, "crm.loyalty.v1") if m["type"] == "tier.changed"]
    assert [(m["data"]["from"], m["data"]["to"]) for m in changes] == [("base", "top")]


async def test_redeem_twice_with_same_id_applies_once_and_other_body_conflicts(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await adjust(sm, T0, "c1", "a1", "5000")
    body = {"redemption_id": "r1", "customer_id": "c1", "check_amount": D("100"), "points": D("1000")}
    first, created = await redeem(sm, T0, **body)
    again, created_again = await redeem(sm, T0, **body)
    assert created and not created_again
    assert first.points_applied == again.points_applied == D("1000")
    assert first.money_applied == D("10.00")
    assert await balance(sm, "c1") == D("4000")
    with pytest.raises(IdempotencyConflict):
        await redeem(sm, T0, **{**body, "points": D("999")})
    assert await balance(sm, "c1") == D("4000")
    await check_invariants(sm, "c1")


async def test_redemption_is_limited_to_the_configured_share_of_the_check(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await adjust(sm, T0, "c1", "a1", "10000")
    result, _ = await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("50"), points=D("9000"))
    # 30% of 50 = 15.00 money = 1500 points
    assert result.points_applied == D("1500") and result.money_applied == D("15.00")
    assert result.balance == D("8500")


async def test_redemption_without_points_is_refused_and_changes_nothing(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.customer_updated("c1", T0))
    with pytest.raises(InsufficientPoints):
        await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("50"))
    assert await ledger(sm, "c1") == []


async def test_spending_takes_the_oldest_lot_first(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "old", "100", T0))
    await apply(sm, T0, f.purchase("c1", "new", "100", T0 + timedelta(days=10)))
    await redeem(
        sm, T0 + timedelta(days=11), redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("150")
    )
    async with sm() as s:
        rows = dict((await s.execute(text("SELECT id, remaining FROM lots WHERE customer_id = 'c1'"))).all())
    assert sorted(rows.values()) == [D("0"), D("50")]
    old_lot = next(k for k in rows if rows[k] == 0)
    assert old_lot.startswith("accrual:") and "old" not in old_lot  # lot id is the accrual's ref
    await check_invariants(sm, "c1")


async def test_refund_reverses_accrual_and_returns_redeemed_points_proportionally(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await adjust(sm, T0, "c1", "a1", "1000")
    r, _ = await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("1000"))
    assert r.money_applied == D("10.00")
    # check of 100, 10 paid with points -> 90 paid -> 90 points accrued
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0, redemption_id="r1", points_redeemed="1000"))
    assert await balance(sm, "c1") == D("90")
    await apply(sm, T0, f.refund("c1", "o1", "45", T0 + timedelta(hours=1)))  # half of what was paid
    # returns 500 redeemed points and reverses 45 accrued ones
    assert await balance(sm, "c1") == D("545")
    await apply(sm, T0, f.refund("c1", "o1", "45", T0 + timedelta(hours=2)))
    assert await balance(sm, "c1") == D("1000")
    await apply(sm, T0, f.refund("c1", "o1", "45", T0 + timedelta(hours=3)))  # nothing left to refund
    assert await balance(sm, "c1") == D("1000")
    kinds = [(k, p) for k, p, _ in await ledger(sm, "c1")]
    assert kinds == [
        ("adjustment", D("1000")),
        ("redemption", D("-1000")),
        ("accrual", D("90")),
        ("reversal", D("500")),
        ("reversal", D("-45")),
        ("reversal", D("500")),
        ("reversal", D("-45")),
    ]
    async with sm() as s:
        rec = (await s.execute(text("SELECT reconciliation FROM purchases WHERE order_id = 'o1'"))).scalar()
    assert rec == "matched"
    await check_invariants(sm, "c1")


async def test_cancelled_redemption_returns_points_once_and_settled_cannot_be_cancelled(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await adjust(sm, T0, "c1", "a1", "1000")
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("400"))
    for _ in range(2):
        async with sm() as s:
            out = await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id="r1", now=T0)
            await s.commit()
        assert out.status == "cancelled"
    assert await balance(sm, "c1") == D("1000")
    await redeem(sm, T0, redemption_id="r2", customer_id="c1", check_amount=D("100"), points=D("400"))
    await apply(sm, T0, f.purchase("c1", "o2", "100", T0, redemption_id="r2"))
    async with sm() as s:
        with pytest.raises(RedemptionNotCancellable):
            await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id="r2", now=T0)
    await check_invariants(sm, "c1")


async def test_negative_adjustment_beyond_balance_is_refused(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await adjust(sm, T0, "c1", "a1", "100")
    with pytest.raises(InsufficientPoints):
        await adjust(sm, T0, "c1", "a2", "-100.01")
    out, created = await adjust(sm, T0, "c1", "a3", "-40", reason="wrong accrual")
    assert created and out.balance == D("60")
    _, created = await adjust(sm, T0, "c1", "a3", "-40", reason="wrong accrual")
    assert not created
    with pytest.raises(IdempotencyConflict):
        await adjust(sm, T0, "c1", "a3", "-41", reason="wrong accrual")
    assert await check_invariants(sm, "c1") == D("60")


async def test_ledger_refuses_update_and_delete(db):
    _, sm = db
    await adjust(sm, T0, "c1", "a1", "100")
    for sql in ("UPDATE ledger SET points = 1", "DELETE FROM ledger"):
        async with sm() as s:
            with pytest.raises(DBAPIError, match="append-only"):
                await s.execute(text(sql))


async def test_expiry_sweep_reminds_once_then_expires_oldest_first(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0))
    await apply(sm, T0, f.purchase("c1", "o2", "100", T0 + timedelta(days=30)))
    assert (await sweep(sm, T0 + timedelta(days=100)))["reminders"] == 0
    at = T0 + timedelta(days=170)  # 10 days before the first lot expires
    assert (await sweep(sm, at))["reminders"] == 1
    assert (await sweep(sm, at + timedelta(days=1)))["reminders"] == 0
    reminders = await outbox(sm, "crm.messages.v1")
    assert len(reminders) == 1
    msg = reminders[0]
    assert msg["template"] == "points_expiring" and msg["kind"] == "transactional"
    assert msg["variables"]["points"] == "100.00" and msg["variables"]["expires_on"] == "2026-07-04"
    assert msg["id"] == "loyalty:points_expiring:c1:2026-07-04"
    result = await sweep(sm, T0 + timedelta(days=181))
    assert result["lots_expired"] == 1
    assert await balance(sm, "c1") == D("100")
    expired = [m for m in await outbox(sm, "crm.loyalty.v1") if m["type"] == "points.expired"]
    assert len(expired) == 1 and D(expired[0]["points"]) == D("-100")
    assert (await sweep(sm, T0 + timedelta(days=181)))["lots_expired"] == 0
    await check_invariants(sm, "c1")


async def test_expired_points_cannot_be_spent_before_the_sweep(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0))
    with pytest.raises(InsufficientPoints):
        await redeem(sm, T0 + timedelta(days=181), redemption_id="r1", customer_id="c1", check_amount=D("100"))


async def test_referral_rewards_both_sides_once_on_first_purchase(db):
    _, sm = db
    await set_programme(
        sm, {**f.SCENARIO4_PROGRAMME, "referral_bonus_referrer": "500", "referral_bonus_referred": "200"}, T0
    )
    await apply(sm, T0, f.customer_updated("alice", T0))
    async with sm() as s:
        code = (await s.execute(text("SELECT referral_code FROM accounts WHERE customer_id = 'alice'"))).scalar()
    await apply(sm, T0, f.customer_updated("bob", T0, referred_by=code))
    await apply(sm, T0, f.purchase("bob", "o1", "10", T0), f.purchase("bob", "o2", "10", T0))
    await apply(sm, T0, f.purchase("bob", "o3", "10", T0))
    assert await balance(sm, "alice") == D("500")
    assert await balance(sm, "bob") == D("200") + D("30")
    await check_invariants(sm, "alice")
    await check_invariants(sm, "bob")


async def test_self_referral_cycles_and_late_referrals_are_refused(db):
    _, sm = db
    await set_programme(
        sm, {**f.SCENARIO4_PROGRAMME, "referral_bonus_referrer": "500", "referral_bonus_referred": "200"}, T0
    )
    await apply(sm, T0, f.customer_updated("a", T0), f.customer_updated("b", T0), f.customer_updated("c", T0))
    async with sm() as s:
        codes = dict((await s.execute(text("SELECT customer_id, referral_code FROM accounts"))).all())
    await apply(sm, T0, f.customer_updated("a", T0, referred_by=codes["a"]))  # self
    await apply(sm, T0, f.customer_updated("b", T0, referred_by=codes["a"]))  # a -> b
    await apply(sm, T0, f.customer_updated("c", T0, referred_by=codes["b"]))  # b -> c
    await apply(sm, T0, f.customer_updated("a", T0, referred_by=codes["c"]))  # would close a cycle
    await apply(sm, T0, f.purchase("d", "o1", "10", T0))
    await apply(sm, T0, f.customer_updated("d", T0, referred_by=codes["a"]))  # not new any more
    async with sm() as s:
        refs = dict((await s.execute(text("SELECT customer_id, referred_by FROM accounts"))).all())
    assert refs == {"a": None, "b": "a", "c": "b", "d": None}


async def test_goal_assigned_on_segment_entry_awards_once_and_unmet_goals_expire(db):
    _, sm = db
    from loyalty import goals

    programme = await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    for cid in ("c1", "c2"):
        async with sm() as s:
            book = Book(s, programme, T0)
            for _ in range(2):  # entering twice assigns one goal
                await goals.assign(
                    book=book,
                    programme=programme,
                    customer_id=cid,
                    segment_key="visits_dropped",
                    cause_id=f"seg-{cid}-{_}",
                    at=T0,
                )
            await book.flush()
            await s.commit()
    offers = await outbox(sm, "crm.messages.v1")
    assert sorted(m["customer_id"] for m in offers) == ["c1", "c2"]
    assert offers[0]["variables"]["purchases"] == 3 and offers[0]["variables"]["reward_points"] == "300.00"
    for i in range(4):
        await apply(sm, T0, f.purchase("c1", f"o{i}", "10", T0 + timedelta(days=i + 1)))
    await apply(sm, T0, f.purchase("c2", "x", "10", T0 + timedelta(days=1)))
    assert [k for k, _, _ in await ledger(sm, "c1")].count("goal_bonus") == 1
    assert await balance(sm, "c1") == D("300") + 4 * D("10")
    result = await sweep(sm, T0 + timedelta(days=31))
    assert result["goals_expired"] == 1
    async with sm() as s:
        status = dict((await s.execute(text("SELECT customer_id, status FROM goals"))).all())
    assert status == {"c1": "completed", "c2": "expired"}


async def test_report_shows_issued_redeemed_expired_and_liability_by_month(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0), f.purchase("c2", "o2", "100", T0))
    await apply(sm, T0, f.purchase("c1", "o3", "100", T0 + timedelta(days=31)))
    await redeem(
        sm, T0 + timedelta(days=32), redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("50")
    )
    await sweep(sm, T0 + timedelta(days=200))
    async with sm() as s:
        report = await reports.programme_report(session=s)
    months = {m.month.isoformat(): m for m in report.months}
    assert months["2026-01-01"].issued == D("200") and months["2026-01-01"].liability_points == D("200")
    assert months["2026-02-01"].redeemed == D("50") and months["2026-02-01"].liability_points == D("250")
    assert months["2026-07-01"].expired == D("150")
    assert report.redemption_rate == D("0.1667")
    assert report.repeat_purchase_rate == D("0.5000")
    assert report.months[-1].liability_points >= 0


async def test_birthday_bonus_is_credited_once_a_year_on_the_birthday(db):
    _, sm = db
    await set_programme(sm, {**f.SCENARIO4_PROGRAMME, "birthday_bonus": "250"}, T0)
    await apply(sm, T0, f.customer_updated("c1", T0, birth_date="1990-03-10"))
    await apply(sm, T0, f.customer_updated("leap", T0, birth_date="1992-02-29"))
    assert (await sweep(sm, datetime(2026, 3, 9, 23, tzinfo=UTC)))["birthday_bonuses"] == 0
    assert (await sweep(sm, datetime(2026, 3, 10, 8, tzinfo=UTC)))["birthday_bonuses"] == 1
    assert (await sweep(sm, datetime(2026, 3, 10, 9, tzinfo=UTC)))["birthday_bonuses"] == 0
    assert await balance(sm, "c1") == D("250")
    assert (await sweep(sm, datetime(2027, 2, 28, 9, tzinfo=UTC)))["birthday_bonuses"] == 1  # leap day, common year
    assert (await sweep(sm, datetime(2027, 3, 10, 9, tzinfo=UTC)))["birthday_bonuses"] == 1
    kinds = [k for k, _, _ in await ledger(sm, "c1")]
    assert kinds == ["birthday_bonus", "expiry", "birthday_bonus"]  # last year's bonus expired after 180 days
    assert await balance(sm, "c1") == D("250")
    await check_invariants(sm, "c1")
    await check_invariants(sm, "leap")


async def test_tier_drops_when_purchases_leave_the_12_month_window(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "1200", T0))
    async with sm() as s:
        tier = (await s.execute(text("SELECT tier FROM accounts WHERE customer_id = 'c1'"))).scalar()
    assert tier == "top"
    assert (await sweep(sm, T0 + timedelta(days=300)))["tiers_changed"] == 0
    assert (await sweep(sm, T0 + timedelta(days=366)))["tiers_changed"] == 1
    assert (await sweep(sm, T0 + timedelta(days=367)))["tiers_changed"] == 0
    async with sm() as s:
        tier = (await s.execute(text("SELECT tier FROM accounts WHERE customer_id = 'c1'"))).scalar()
    assert tier == "base"
    changes = [m["data"] for m in await outbox(sm, "crm.loyalty.v1") if m["type"] == "tier.changed"]
    assert [(c["from"], c["to"]) for c in changes] == [("base", "top"), ("top", "base")]


async def test_welcome_bonus_is_credited_once_when_the_account_is_created(db):
    _, sm = db
    await set_programme(sm, {**f.SCENARIO4_PROGRAMME, "welcome_bonus": "150"}, T0)
    await apply(sm, T0, f.customer_updated("c1", T0), f.customer_updated("c1", T0))
    await apply(sm, T0, f.purchase("c1", "o1", "10", T0))
    assert [k for k, _, _ in await ledger(sm, "c1")] == ["welcome_bonus", "accrual"]
    assert await check_invariants(sm, "c1") == D("160")


async def test_window_spend_from_monthly_totals_equals_the_sum_over_purchases(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    plus2 = timezone(timedelta(hours=2))
    bought = [
        ("o1", "100", datetime(2025, 3, 1, tzinfo=UTC)),
        ("o2", "200", datetime(2025, 3, 20, 8, tzinfo=UTC)),
        ("o3", "300", datetime(2025, 4, 1, 1, tzinfo=plus2)),  # 31 March in UTC
        ("o4", "400", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("o5", "500", T0),
    ]
    await apply(sm, T0, *(f.purchase("c1", o, total, at) for o, total, at in bought))
    await apply(sm, T0, f.refund("c1", "o2", "50", T0), f.refund("c1", "o3", "300", T0))
    await apply(sm, T0, f.refund("c1", "o4", "1", T0))
    await check_invariants(sm, "c1")
    sinces = [at for _, _, at in bought] + [
        datetime(2025, 3, 10, tzinfo=UTC),
        datetime(2025, 3, 31, 23, 30, tzinfo=UTC),
        datetime(2025, 4, 30, tzinfo=UTC),
        datetime(2025, 2, 1, tzinfo=UTC),
    ]
    async with sm() as s:
        repo = LoyaltyRepository(s)
        for since in sinces:
            expected = (
                await s.execute(
                    text(
                        "SELECT coalesce(sum(paid - refunded), 0) FROM purchases WHERE customer_id = 'c1' "
                        "AND occurred_at > :since"
                    ),
                    {"since": since},
                )
            ).scalar()
            assert (await repo.spend_since(["c1", "nobody"], since)) == {"c1": expected, "nobody": 0}, since


async def debt(sm, customer_id):
    async with sm() as s:
        return (
            await s.execute(text("SELECT points_debt FROM accounts WHERE customer_id = :c"), {"c": customer_id})
        ).scalar()


async def entries(sm, customer_id):
    async with sm() as s:
        rows = await s.execute(
            text(
                "SELECT kind, points, debt_change, balance_after, data FROM ledger WHERE customer_id = :c ORDER BY seq"
            ),
            {"c": customer_id},
        )
        return [tuple(r) for r in rows]


async def test_refunding_every_order_after_spending_their_points_ends_at_zero_with_no_debt(db):
    """QA's repro: the reversal beyond the balance was forgotten and the customer kept 405 points."""
    _, sm = db  # the default programme: 1%, no tiers, 0.01 per point, up to 30% of a check
    wine = [{"sku": "w", "name": "wine", "category": "wine", "quantity": "1", "unit_price": "1000.00"}]
    await apply(sm, T0, f.purchase("c1", "A", "1000.00", T0, items=wine))
    assert await balance(sm, "c1") == D("1000")
    r, _ = await redeem(sm, T0, redemption_id="R", customer_id="c1", check_amount=D("100.00"), points=D("500"))
    assert (r.points_applied, r.balance) == (D("500"), D("500"))
    await apply(
        sm,
        T0,
        f.purchase(
            "c1",
            "B",
            "100.00",
            T0,
            items=[{**wine[0], "unit_price": "100.00"}],
            redemption_id="R",
            points_redeemed="500.00",
        ),
    )
    assert await balance(sm, "c1") == D("595")  # 95.00 paid: +95
    await apply(sm, T0, f.refund("c1", "A", "1000.00", T0 + timedelta(hours=1)))
    # 595 taken, the other 405 owed, not forgotten
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("405"))
    await check_invariants(sm, "c1")
    await apply(sm, T0, f.refund("c1", "B", "100.00", T0 + timedelta(hours=2)))
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("0"))
    assert [(k, p, dc, b) for k, p, dc, b, _ in await entries(sm, "c1")] == [
        ("accrual", D("1000"), D("0"), D("1000")),
        ("redemption", D("-500"), D("0"), D("500")),
        ("accrual", D("95"), D("0"), D("595")),
        ("reversal", D("-595"), D("405"), D("0")),  # refund A: what was taken, and the debt
        ("reversal", D("500"), D("0"), D("500")),  # refund B: the redeemed points come back...
        ("debt_settlement", D("-405"), D("-405"), D("95")),  # ...and pay the debt first
        ("reversal", D("-95"), D("0"), D("0")),  # then B's accrual is reversed
    ]
    reversal_a = (await entries(sm, "c1"))[3][4]
    assert (reversal_a["requested"], reversal_a["shortfall"], reversal_a["debt_after"]) == (
        "1000.00",
        "405.00",
        "405.00",
    )
    async with sm() as s:
        lots = dict((await s.execute(text("SELECT id, remaining FROM lots WHERE customer_id = 'c1'"))).all())
    assert set(lots.values()) == {D("0")}
    assert await check_invariants(sm, "c1") == 0


async def test_points_debt_is_netted_against_the_next_accruals_before_they_can_be_spent(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "500", T0))  # 500 points
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("5000"), points=D("500"))
    await apply(sm, T0, f.refund("c1", "o1", "500", T0))
    # Nothing to take: the reversal moves only the debt.
    assert (await entries(sm, "c1"))[-1][:4] == ("reversal", D("0"), D("500"), D("0"))
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("500"))
    await apply(sm, T0, f.purchase("c1", "o2", "300", T0 + timedelta(days=1)))
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("200"))
    with pytest.raises(InsufficientPoints):
        await redeem(sm, T0 + timedelta(days=1), redemption_id="r2", customer_id="c1", check_amount=D("100"))
    await apply(sm, T0, f.purchase("c1", "o3", "500", T0 + timedelta(days=2)))
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("300"), D("0"))
    kinds = [(k, p, dc) for k, p, dc, _, _ in await entries(sm, "c1")][-4:]
    assert kinds == [
        ("accrual", D("300"), D("0")),
        ("debt_settlement", D("-300"), D("-300")),
        ("accrual", D("500"), D("0")),
        ("debt_settlement", D("-200"), D("-200")),
    ]
    async with sm() as s:
        lots = (
            await s.execute(text("SELECT points, remaining FROM lots WHERE customer_id = 'c1' ORDER BY earned_at"))
        ).all()
    # The settled points left the lots they were credited to; the rest of the last one is spendable.
    assert [tuple(lot) for lot in lots] == [(D("500"), D("0")), (D("300"), D("0")), (D("500"), D("300"))]
    r, _ = await redeem(sm, T0 + timedelta(days=2), redemption_id="r3", customer_id="c1", check_amount=D("1000"))
    assert r.points_applied == D("300")
    settled = [m for m in await outbox(sm, "crm.loyalty.v1") if m["data"].get("reverses") == "debt"]
    assert [(m["type"], D(m["points"]), D(m["data"]["debt_after"])) for m in settled] == [
        ("points.reversed", D("-300"), D("200")),
        ("points.reversed", D("-200"), D("0")),
    ]
    await check_invariants(sm, "c1")


async def test_points_debt_is_netted_against_redeemed_points_returned_by_a_cancel(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "800", T0))  # 800 points
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("5000"), points=D("600"))
    await apply(sm, T0, f.refund("c1", "o1", "800", T0))  # 200 taken, 600 owed
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("600"))
    async with sm() as s:
        out = await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id="r1", now=T0)
        await s.commit()
    assert out.points_returned == D("600")
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("0"))
    assert [(k, p, dc) for k, p, dc, _, _ in await entries(sm, "c1")][-2:] == [
        ("reversal", D("600"), D("0")),
        ("debt_settlement", D("-600"), D("-600")),
    ]
    await check_invariants(sm, "c1")


async def test_redeemed_points_returned_after_their_lot_expired_still_pay_the_debt_they_stand_for(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "800", T0))  # the lot expires 180 days later
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("5000"), points=D("600"))
    await apply(sm, T0, f.refund("c1", "o1", "800", T0 + timedelta(days=1)))
    assert await debt(sm, "c1") == D("600")
    late = T0 + timedelta(days=200)
    async with sm() as s:
        await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id="r1", now=late)
        await s.commit()
    # The 600 points that came back are the 600 the reversal could not take: nothing is owed, nothing expires.
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("0"))
    assert (await sweep(sm, late))["lots_expired"] == 0
    await check_invariants(sm, "c1")


async def test_points_debt_is_netted_against_bonuses_and_adjustments(db):
    _, sm = db
    await set_programme(sm, {**f.SCENARIO4_PROGRAMME, "birthday_bonus": "250"}, T0)
    await apply(sm, T0, f.customer_updated("c1", T0, birth_date="1990-03-10"))
    await apply(sm, T0, f.purchase("c1", "o1", "700", T0))
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("5000"), points=D("700"))
    await apply(sm, T0, f.refund("c1", "o1", "700", T0))
    assert await debt(sm, "c1") == D("700")
    birthday = datetime(2026, 3, 10, 8, tzinfo=UTC)
    assert (await sweep(sm, birthday))["birthday_bonuses"] == 1
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("0"), D("450"))
    out, created = await adjust(sm, birthday, "c1", "a1", "600", reason="goodwill")
    assert created and out.balance == D("150")
    again, created = await adjust(sm, birthday, "c1", "a1", "600", reason="goodwill")
    assert not created and again == out  # the replay answers the same balance, after the settlement
    assert (await balance(sm, "c1"), await debt(sm, "c1")) == (D("150"), D("0"))
    assert [(k, p, dc, b) for k, p, dc, b, _ in await entries(sm, "c1")][-4:] == [
        ("birthday_bonus", D("250"), D("0"), D("250")),
        ("debt_settlement", D("-250"), D("-250"), D("0")),
        ("adjustment", D("600"), D("0"), D("600")),
        ("debt_settlement", D("-450"), D("-450"), D("150")),
    ]
    events = [m for m in await outbox(sm, "crm.loyalty.v1") if m["data"].get("reverses") == "debt"]
    assert [(m["id"], D(m["points"]), D(m["balance"])) for m in events] == [
        ("loyalty:points.reversed:debt:birthday:c1:2026", D("-250"), D("0")),
        ("loyalty:points.reversed:debt:adjustment:a1", D("-450"), D("150")),
    ]
    async with sm() as s:
        report = await reports.programme_report(session=s)
    # Settled debt counts as reversed: what was issued net of reversals is what remains earned.
    assert report.issued_total == D("700") + D("250") - D("700")
    await check_invariants(sm, "c1")
