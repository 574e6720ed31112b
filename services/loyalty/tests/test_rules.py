"""Each rule in one place, and what must exist twice pinned together: the SQL redemption and the Book, the tier
rule in SQL and in Python, the models and the migrations, and every outbox message against its contract model."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from crm_common.contract.messages import MessageRequested
from crm_common.db import create_engine, create_sessionmaker
from crm_common.outbox import TOPIC_MODELS
from crm_common.testing.schema import schema_drift
from loyalty import goals, redemptions
from loyalty.ledger import Book, load_programme
from loyalty.models import Base
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig, RedemptionCreate
from loyalty.settings import TOPIC_LOYALTY, TOPIC_MESSAGES

from . import factories as f
from .conftest import apply, check_invariants, set_programme
from .test_ledger import adjust, redeem, sweep

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
D = Decimal


async def published(sm: Any, topic: str, type_: str | None = None) -> list[Any]:
    """Every outbox row of `topic`, each validated against the topic's contract model; those of `type_`."""
    async with sm() as s:
        rows = (await s.execute(text("SELECT key, value FROM outbox WHERE topic = :t ORDER BY id"), {"t": topic})).all()
    messages = []
    for row in rows:
        message = TOPIC_MODELS[topic].model_validate_json(bytes(row.value))
        assert message.customer_id == row.key  # keyed by customer, so one customer's messages stay ordered
        messages.append(message)
    return [m for m in messages if type_ is None or m.type == type_]


# -- models against migrations ------------------------------------------------------------------------------


async def test_models_describe_the_migrated_schema(make_database):
    assert await schema_drift(await make_database("loyalty"), Base.metadata) == []


# -- every message type against its contract model -------------------------------------------------------------


async def test_accrual_publishes_points_accrued_and_tier_changed(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "400", T0, event_id="e1"), f.purchase("c1", "o2", "700", T0))
    accrued = await published(sm, TOPIC_LOYALTY, "points.accrued")
    assert (accrued[0].id, accrued[0].points, accrued[0].balance) == (
        "loyalty:points.accrued:accrual:pos:e1",
        D("400"),
        D("400"),
    )
    assert accrued[1].points == D("2100") and accrued[1].balance == D("2500")  # 700 at the top tier's 3%
    assert accrued[0].data["paid"] == "400" and accrued[0].data["tier"] == "base"
    (tier,) = await published(sm, TOPIC_LOYALTY, "tier.changed")
    assert tier.data == {"from": "base", "to": "top", "spend_12m": "1100"}


async def test_refund_publishes_points_reversed_for_the_accrual_and_for_the_debt(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "10", T0))
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("4"))
    await apply(sm, T0, f.refund("c1", "o1", "10", T0, event_id="rf1"))  # 6 points left of 10: 4 owed
    await apply(sm, T0, f.purchase("c1", "o2", "20", T0 + timedelta(days=1)))
    reversed_ = await published(sm, TOPIC_LOYALTY, "points.reversed")
    assert [(m.id, m.points, m.data["reverses"]) for m in reversed_] == [
        ("loyalty:points.reversed:reversal:pos:rf1", D("-6"), "accrual"),
        ("loyalty:points.reversed:debt:" + reversed_[1].data["settles"], D("-4"), "debt"),
    ]
    assert reversed_[0].data["shortfall"] == "4.00" and reversed_[1].balance == D("16")
    await check_invariants(sm, "c1")


async def test_redemption_by_the_sql_function_publishes_points_redeemed_and_notifies_the_relay(db, monkeypatch):
    url, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "500", T0))

    async def no_book(**_: Any) -> Any:
        raise AssertionError("the SQL function should have answered")

    monkeypatch.setattr(redemptions, "redeem_in_book", no_book)
    listener = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    notified: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    await listener.add_listener(
        "crm_outbox", lambda _conn, _pid, channel, payload: notified.put_nowait((channel, payload))
    )
    try:
        out, created = await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("10"), order_id="o9")
        assert created and out.points_applied == D("300") and out.balance == D("200")
        assert await asyncio.wait_for(notified.get(), 5) == ("crm_outbox", "")  # at the commit, no payload
    finally:
        await listener.close()
    (m,) = await published(sm, TOPIC_LOYALTY, "points.redeemed")
    assert (m.id, m.customer_id, m.points, m.balance, m.occurred_at) == (
        "loyalty:points.redeemed:redemption:r1",
        "c1",
        D("-300"),
        D("200"),
        T0,
    )
    assert m.data["money"] == "3.00" and m.data["check_amount"] == "10" and sum(map(D, m.data["lots"].values())) == 300


async def test_cancel_publishes_points_reversed_and_redemption_cancelled(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "500", T0))
    await redeem(sm, T0, redemption_id="r1", customer_id="c1", check_amount=D("100"), points=D("30"))
    async with sm() as s:
        await redemptions.cancel(session=s, programme=await load_programme(s), redemption_id="r1", now=T0)
        await s.commit()
    (returned,) = await published(sm, TOPIC_LOYALTY, "points.reversed")
    assert returned.data["reverses"] == "redemption" and returned.points == D("30") and returned.balance == D("500")
    (cancelled,) = await published(sm, TOPIC_LOYALTY, "redemption.cancelled")
    assert (cancelled.id, cancelled.points, cancelled.balance) == ("loyalty:redemption.cancelled:r1", D("30"), D("500"))


async def test_adjustment_publishes_points_adjusted(db):
    _, sm = db
    await adjust(sm, T0, "c1", "a1", "70", reason="goodwill")
    await adjust(sm, T0, "c1", "a2", "-20", reason="correction")
    adjusted = await published(sm, TOPIC_LOYALTY, "points.adjusted")
    assert [(m.id, m.points, m.balance, m.data["reason"]) for m in adjusted] == [
        ("loyalty:points.adjusted:adjustment:a1", D("70"), D("70"), "goodwill"),
        ("loyalty:points.adjusted:adjustment:a2", D("-20"), D("50"), "correction"),
    ]


async def assign_goal(sm: Any, programme: ProgrammeConfig, customer_id: str, at: datetime) -> None:
    async with sm() as s:
        book = Book(s, programme, at)
        await goals.assign(
            book=book,
            programme=programme,
            customer_id=customer_id,
            segment_key="visits_dropped",
            cause_id="seg1",
            at=at,
        )
        await book.flush()
        await s.commit()


async def test_goal_assignment_publishes_goal_assigned_and_requests_the_offer_message(db):
    _, sm = db
    programme = await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await assign_goal(sm, programme, "c1", T0)
    (assigned,) = await published(sm, TOPIC_LOYALTY, "goal.assigned")
    assert assigned.id == "loyalty:goal.assigned:goal:c1:seg1" and assigned.points == D("300")
    assert assigned.data["purchases"] == 3 and assigned.data["days"] == 30
    (offer,) = await published(sm, TOPIC_MESSAGES)
    assert isinstance(offer, MessageRequested)
    assert (offer.id, offer.kind, offer.template, offer.source_service) == (
        "loyalty:goal_offer:c1:seg1",
        "marketing",
        "loyalty_goal_offer",
        "loyalty",
    )
    assert offer.expires_at == T0 + timedelta(days=30)
    assert offer.variables == {
        "purchases": 3,
        "days": 30,
        "reward_points": "300.00",
        "reward_value": "3.00",
        "due_date": "2026-02-04",
    }


async def test_goal_completion_and_expiry_publish_goal_completed_and_goal_expired(db):
    _, sm = db
    programme = await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await assign_goal(sm, programme, "c1", T0)
    await assign_goal(sm, programme, "c2", T0)
    for i in range(3):
        await apply(sm, T0, f.purchase("c1", f"o{i}", "10", T0 + timedelta(days=i + 1)))
    (completed,) = await published(sm, TOPIC_LOYALTY, "goal.completed")
    assert (completed.customer_id, completed.points, completed.balance) == ("c1", D("300"), D("330"))
    assert completed.data["goal_id"] == "c1:seg1"
    assert (await sweep(sm, T0 + timedelta(days=31)))["goals_expired"] == 1
    (expired,) = await published(sm, TOPIC_LOYALTY, "goal.expired")
    assert (expired.id, expired.customer_id, expired.occurred_at) == (
        "loyalty:goal.expired:c2:seg1",
        "c2",
        T0 + timedelta(days=30),
    )
    assert expired.data == {"goal_id": "c2:seg1", "progress": 0, "target": 3}


async def test_referral_publishes_referral_rewarded_to_both_sides(db):
    _, sm = db
    await set_programme(
        sm, {**f.SCENARIO4_PROGRAMME, "referral_bonus_referrer": "500", "referral_bonus_referred": "200"}, T0
    )
    await apply(sm, T0, f.customer_updated("alice", T0))
    async with sm() as s:
        code = (await LoyaltyRepository(s).get_account("alice")).referral_code  # type: ignore[union-attr]
    await apply(sm, T0, f.customer_updated("bob", T0, referred_by=code))
    await apply(sm, T0, f.purchase("bob", "o1", "10", T0))
    rewarded = await published(sm, TOPIC_LOYALTY, "referral.rewarded")
    assert sorted((m.customer_id, m.points, m.id) for m in rewarded) == [
        ("alice", D("500"), "loyalty:referral.rewarded:referral:bob:referrer"),
        ("bob", D("200"), "loyalty:referral.rewarded:referral:bob:referred"),
    ]
    assert all(m.data["referrer"] == "alice" and m.data["referred"] == "bob" for m in rewarded)


async def test_expiry_sweep_publishes_points_expired_per_lot_with_the_running_balance(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0, event_id="e1"))
    await apply(sm, T0, f.purchase("c1", "o2", "200", T0 + timedelta(hours=1), event_id="e2"))
    await apply(sm, T0, f.purchase("c1", "o3", "300", T0 + timedelta(days=10), event_id="e3"))
    assert (await sweep(sm, T0 + timedelta(days=181)))["lots_expired"] == 2
    expired = await published(sm, TOPIC_LOYALTY, "points.expired")
    assert [(m.id, m.points, m.balance, m.data) for m in expired] == [
        ("loyalty:points.expired:expiry:accrual:pos:e1:0.00", D("-100"), D("500"), {"lot_id": "accrual:pos:e1"}),
        ("loyalty:points.expired:expiry:accrual:pos:e2:0.00", D("-200"), D("300"), {"lot_id": "accrual:pos:e2"}),
    ]
    assert expired[0].occurred_at == T0 + timedelta(days=180)
    await check_invariants(sm, "c1")


async def test_reminder_sweep_requests_one_points_expiring_message_per_customer_and_day(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "100", T0), f.purchase("c1", "o2", "250", T0 + timedelta(hours=2)))
    await apply(sm, T0, f.purchase("c2", "o3", "50", T0 + timedelta(days=1)))
    assert (await sweep(sm, T0 + timedelta(days=170)))["reminders"] == 2
    assert (await sweep(sm, T0 + timedelta(days=171)))["reminders"] == 0
    reminders = sorted(await published(sm, TOPIC_MESSAGES), key=lambda m: m.customer_id)
    assert [(m.id, m.kind, m.template, m.source_service) for m in reminders] == [
        ("loyalty:points_expiring:c1:2026-07-04", "transactional", "points_expiring", "loyalty"),
        ("loyalty:points_expiring:c2:2026-07-05", "transactional", "points_expiring", "loyalty"),
    ]
    assert reminders[0].expires_at == T0 + timedelta(days=180)
    assert reminders[0].variables == {
        "points": "350.00",
        "amount": "3.50",
        "expires_on": "2026-07-04",
        "expires_at": "2026-07-04T12:00:00.000000+00:00",
    }


async def test_tier_sweep_publishes_tier_changed_when_spend_leaves_the_window(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "o1", "1200", T0))
    later = T0 + timedelta(days=366)
    assert (await sweep(sm, later))["tiers_changed"] == 1
    changes = await published(sm, TOPIC_LOYALTY, "tier.changed")
    assert [m.data for m in changes] == [
        {"from": "base", "to": "top", "spend_12m": "1200"},
        {"from": "top", "to": "base", "spend_12m": "0", "reason": "window"},
    ]
    assert changes[1].id == f"loyalty:tier.changed:sweep:c1:{later.isoformat()}" and changes[1].occurred_at == later


async def test_birthday_sweep_publishes_points_accrued_for_the_bonus(db):
    _, sm = db
    await set_programme(sm, {**f.SCENARIO4_PROGRAMME, "birthday_bonus": "250"}, T0)
    await apply(sm, T0, f.customer_updated("c1", T0, birth_date="1990-03-10"))
    birthday = datetime(2026, 3, 10, 8, tzinfo=UTC)
    assert (await sweep(sm, birthday))["birthday_bonuses"] == 1
    assert (await sweep(sm, birthday + timedelta(hours=1)))["birthday_bonuses"] == 0
    (bonus,) = await published(sm, TOPIC_LOYALTY, "points.accrued")
    assert (bonus.id, bonus.points, bonus.balance, bonus.data["year"]) == (
        "loyalty:points.accrued:birthday:c1:2026",
        D("250"),
        D("250"),
        2026,
    )
    await check_invariants(sm, "c1")


# -- the SQL redemption and the Book: same inputs, same ledger -------------------------------------------------


async def snapshot(sm: Any, customer_id: str) -> dict[str, Any]:
    """Everything a redemption writes: the account, its lots, ledger, redemptions, their lots, the messages."""
    queries = {
        "account": "SELECT balance, points_debt, updated_at FROM accounts WHERE customer_id = :c",
        "lots": "SELECT id, points, remaining, expired_points FROM lots WHERE customer_id = :c ORDER BY id",
        "ledger": "SELECT ref, kind, points, debt_change, balance_after, occurred_at, recorded_at, lot_id, order_id, "
        "redemption_id, data FROM ledger WHERE customer_id = :c ORDER BY seq",
        "redemptions": "SELECT * FROM redemptions WHERE customer_id = :c ORDER BY redemption_id",
        "redemption_lots": "SELECT rl.* FROM redemption_lots rl JOIN redemptions r USING (redemption_id) "
        "WHERE r.customer_id = :c ORDER BY rl.redemption_id, rl.lot_id",
    }
    async with sm() as s:
        found = {k: [tuple(r) for r in await s.execute(text(q), {"c": customer_id})] for k, q in queries.items()}
    found["messages"] = [m.model_dump() for m in await published(sm, TOPIC_LOYALTY)]
    return found


REDEMPTIONS = [
    pytest.param({"check_amount": D("1000"), "points": D("40")}, id="into-the-second-of-two-tied-lots"),
    pytest.param({"check_amount": D("1000"), "points": D("70")}, id="across-lots-into-the-youngest"),
    pytest.param({"check_amount": D("100")}, id="the-most-the-check-allows-is-all-spendable"),
    pytest.param({"check_amount": D("1000"), "points": D("5"), "order_id": "o1"}, id="part-of-the-oldest-lot"),
]


@pytest.mark.parametrize("body", REDEMPTIONS)
async def test_sql_redemption_and_book_redemption_write_the_same_rows(db, make_database, monkeypatch, body):
    """loyalty_redeem() holds the Book's debit rules for speed: on the same account they must write the same."""
    _, sql_sm = db
    engine = create_engine(await make_database("loyalty"), pool_size=2)
    book_sm = create_sessionmaker(engine)
    try:
        for sm in (sql_sm, book_sm):
            # Lots with equal expiry (ids in code-point order: "B" before "a"), a younger one, one past expiry.
            await adjust(sm, T0 - timedelta(days=200), "c1", "old", "40")
            await adjust(sm, T0, "c1", "a", "20")
            await adjust(sm, T0, "c1", "B", "30")
            await adjust(sm, T0 + timedelta(days=1), "c1", "zz", "50")
        at = T0 + timedelta(days=2)
        redemption_in = RedemptionCreate(redemption_id="r1", customer_id="c1", **body)

        async def no_book(**_: Any) -> Any:
            raise AssertionError("the SQL function should have answered")

        with monkeypatch.context() as patched:
            patched.setattr(redemptions, "redeem_in_book", no_book)
            async with sql_sm() as s:
                by_sql, _ = await redemptions.redeem(
                    session=s, programme=await load_programme(s), redemption_in=redemption_in, now=at
                )
                await s.commit()
        async with book_sm() as s:
            by_book, _ = await redemptions.redeem_in_book(
                session=s, programme=await load_programme(s), redemption_in=redemption_in, now=at
            )
            await s.commit()
        assert by_sql == by_book
        sql_rows, book_rows = await snapshot(sql_sm, "c1"), await snapshot(book_sm, "c1")
        assert sql_rows == book_rows
        assert sql_rows["ledger"][-1][1] == "redemption" and by_sql.points_applied > 0
    finally:
        await engine.dispose()


# -- the tier rule: Python for accrual, SQL for the sweep ------------------------------------------------------

SPENDS = st.decimals(min_value=-100, max_value=5000, places=2, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mins=st.lists(st.integers(min_value=0, max_value=4000), max_size=4, unique=True),
    spends=st.lists(SPENDS, max_size=8),
)
async def test_tier_rule_in_sql_is_the_tier_rule_in_python(db, mins, spends):
    _, sm = db
    programme = ProgrammeConfig.model_validate(
        {"tiers": [{"name": f"t{m}", "min_spend": str(m), "rate": "0.02"} for m in mins]}
    )
    spends = spends + [D(m) for m in mins] + [D(m) - D("0.01") for m in mins]  # on and just below each threshold
    async with sm() as s:
        in_sql = await LoyaltyRepository(s).tiers_of_spends(programme, spends)
    assert in_sql == [programme.tier_for(spend)[0] for spend in spends]
