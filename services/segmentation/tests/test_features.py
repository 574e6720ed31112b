"""Profile features computed from crafted histories, through the domain with a real PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from crm_common.db import create_engine, create_sessionmaker, session_scope
from segmentation.profiles import apply_events
from segmentation.repository.profiles import ProfileRepository
from segmentation.segments import sweep_rfm

from .factories import event, item, purchase, records, refund

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)  # a Friday


async def apply(sm, events, now=NOW):
    async with session_scope(sm) as s:
        await apply_events(session=s, records=records(events), now=now, decay_days=90)


async def profile(sm, customer_id, now=NOW):
    async with sm() as s:
        return await ProfileRepository(s).get(customer_id, now=now)


async def test_orders_revenue_margin_and_average_check(db):
    _, sm = db
    t0 = NOW - timedelta(days=30)
    await apply(
        sm,
        [
            purchase(
                "c1",
                t0,
                [
                    item("milk", "dairy", "2.00", 2, cost="1.00"),
                    item("wine-a", "wine", "10.00", cost="6.00"),
                ],
            ),
            purchase("c1", t0 + timedelta(days=10), [item("bread", "bakery", "3.00", cost="1.00")]),
        ],
    )
    p = await profile(sm, "c1")
    assert p["orders"] == 2
    assert p["revenue"] == Decimal("17.00")
    assert p["margin"] == Decimal("8.00")  # (14 - 8) + (3 - 1)
    assert p["avg_check"] == Decimal("8.5")
    assert p["first_purchase_at"] == t0 and p["last_purchase_at"] == t0 + timedelta(days=10)


async def test_partial_and_full_refunds_reduce_revenue_orders_and_favourites(db):
    _, sm = db
    t0 = NOW - timedelta(days=20)
    a = purchase("c2", t0, [item("shoe", "shoes", "50.00")], order_id="A")
    b = purchase("c2", t0 + timedelta(days=1), [item("shirt", "shirts", "20.00", 2)], order_id="B")
    await apply(sm, [a, b])
    # A refund of part of B (one shirt) and all of A; the full refund arrives before nothing else.
    await apply(
        sm,
        [
            refund("c2", t0 + timedelta(days=2), "B", "20.00", [{"sku": "shirt", "quantity": "1"}]),
            refund("c2", t0 + timedelta(days=3), "A", "50.00"),
        ],
    )
    p = await profile(sm, "c2")
    assert p["orders"] == 1
    assert p["revenue"] == Decimal("20.00")
    assert p["top_categories"] == ["shirts"]
    assert p["favourite_product"]["sku"] == "shirt"


async def test_refund_arriving_before_its_purchase_gives_the_same_profile(db):
    _, sm = db
    t0 = NOW - timedelta(days=5)
    await apply(sm, [refund("c3", t0 + timedelta(hours=1), "X", "4.00")])
    await apply(sm, [purchase("c3", t0, [item("cheese", "dairy", "10.00")], order_id="X")])
    p = await profile(sm, "c3")
    assert p["orders"] == 1 and p["revenue"] == Decimal("6.00")


async def test_duplicate_purchase_of_one_order_counts_once(db):
    _, sm = db
    t0 = NOW - timedelta(days=5)
    first = purchase("c4", t0, [item("cheese", "dairy", "10.00")], order_id="SAME")
    again = purchase("c4", t0, [item("cheese", "dairy", "10.00")], order_id="SAME")
    await apply(sm, [first, again])
    await apply(sm, [again])
    p = await profile(sm, "c4")
    assert p["orders"] == 1 and p["revenue"] == Decimal("10.00")


async def test_favourite_product_size_colour_are_recency_weighted(db):
    _, sm = db
    start = NOW - timedelta(days=720)
    evs = []
    for k in range(8):  # every ~90 days: two white shirts and one blue, size M
        at = start + timedelta(days=90 * k)
        evs.append(
            purchase(
                "c5",
                at,
                [
                    item("shirt-white", "shirts", "30.00", 2, size="M", color="white"),
                    item("shirt-blue", "shirts", "30.00", 1, size="M", color="blue"),
                ],
            )
        )
    evs.append(
        purchase(
            "c5",
            start - timedelta(days=400),
            [item("sock", "socks", "2.00", 20, size="L", color="black")],
        )
    )
    await apply(sm, evs)
    p = await profile(sm, "c5")
    assert p["favourite_category"] == "shirts"
    assert p["favourite_product"] == {
        "sku": "shirt-white",
        "name": "Shirt White",
        "category": "shirts",
        "size": "M",
        "color": "white",
    }
    assert p["favourite_size"] == "M" and p["favourite_color"] == "white"
    assert p["cadence_days"] == 90
    assert p["predicted_next_purchase"] == start + timedelta(days=90 * 7) + timedelta(days=90)


async def test_day_of_week_habits_use_the_local_time_of_the_event(db):
    _, sm = db
    berlin = timezone(timedelta(hours=1))
    # 23:30 UTC Thursday is 00:30 Friday in the store: it is a Friday purchase.
    fridays = [datetime(2026, 2, d, 0, 30, tzinfo=berlin) for d in (6, 13, 20)]
    await apply(sm, [purchase("c6", at, [item("wine-a", "wine", "10.00")]) for at in fridays])
    p = await profile(sm, "c6")
    assert p["dow_counts"] == [0, 0, 0, 0, 3, 0, 0]
    assert p["favourite_dow"] == 5 and p["favourite_hour"] == 0


async def test_traits_and_consents_last_writer_by_event_time_wins(db):
    _, sm = db
    t0 = NOW - timedelta(days=3)
    newer = event(
        "customer_updated",
        "c7",
        t0 + timedelta(hours=2),
        {"first_name": "Ann", "consents": {"email": True}},
    )
    older = event(
        "customer_updated",
        "c7",
        t0,
        {
            "first_name": "Anna",
            "city": "Lyon",
            "consents": {"email": False, "sms": True},
            "acquisition_channel": "instagram",
        },
    )
    await apply(sm, [newer])
    await apply(sm, [older])  # late: must not overwrite newer fields
    p = await profile(sm, "c7")
    assert p["traits"]["first_name"] == "Ann" and p["traits"]["city"] == "Lyon"
    assert p["consents"] == {"email": True, "sms": True}
    assert p["acquisition_channel"] == "instagram"
    await apply(sm, [event("customer_updated", "c7", t0 + timedelta(hours=3), {"city": None})])
    assert "city" not in (await profile(sm, "c7"))["traits"]


async def test_last_feedback_and_first_touch_channel(db):
    _, sm = db
    t0 = NOW - timedelta(days=3)
    await apply(
        sm,
        [
            event("feedback", "c8", t0 + timedelta(hours=1), {"rating": 2, "topic": "quality"}),
            event("feedback", "c8", t0, {"rating": 5, "topic": "service"}),
            event(
                "site_visit",
                "c8",
                t0 + timedelta(hours=5),
                {"utm_source": "newsletter"},
                source="site",
            ),
            event("site_visit", "c8", t0, {"utm_source": "google"}, source="site"),
        ],
    )
    p = await profile(sm, "c8")
    assert (p["last_feedback_rating"], p["last_feedback_topic"]) == (2, "quality")
    assert p["acquisition_channel"] == "google"


async def test_anonymous_visits_merge_into_the_customer(db):
    _, sm = db
    t0 = NOW - timedelta(days=3)
    await apply(
        sm,
        [
            event(
                "customer_updated",
                "c9",
                t0,
                {"first_name": "Bo"},
                anonymous_id="anon-9",
                source="site",
            )
        ],
    )
    await apply(
        sm,
        [
            event(
                "site_visit",
                None,
                t0 + timedelta(hours=1),
                {"utm_source": "tiktok"},
                anonymous_id="anon-9",
                source="site",
            )
        ],
    )
    assert (await profile(sm, "c9"))["acquisition_channel"] == "tiktok"


async def test_lifecycle_follows_the_customers_own_cadence(db):
    _, sm = db
    last = NOW - timedelta(days=1)
    evs = [purchase("c10", last - timedelta(days=30 * k), [item("clean", "cleaning", "50.00")]) for k in range(4)]
    await apply(sm, evs)
    assert (await profile(sm, "c10"))["lifecycle"] == "active"
    assert (await profile(sm, "c10", NOW + timedelta(days=60)))["lifecycle"] == "at_risk"
    lapsed = await profile(sm, "c10", NOW + timedelta(days=100))
    assert lapsed["lifecycle"] == "lapsed" and lapsed["churn_kind"] == "regular"
    assert (await profile(sm, "c10", NOW + timedelta(days=400)))["lifecycle"] == "lost"
    await apply(sm, [purchase("c11", NOW - timedelta(days=2), [item("x", "misc", "5.00")])])
    assert (await profile(sm, "c11"))["lifecycle"] == "new"
    one_off = await profile(sm, "c11", NOW + timedelta(days=200))
    assert one_off["churn_kind"] == "one_off"


async def test_discount_affinity(db):
    _, sm = db
    t = NOW - timedelta(days=10)
    hunter = [purchase("c12", t + timedelta(days=k), [item("x", "misc", "10.00", discount="3.00")]) for k in range(4)]
    lover = [
        purchase(
            "c13",
            t + timedelta(days=k),
            [item("x", "misc", "10.00", discount="1.00" if k < 2 else "0")],
        )
        for k in range(3)
    ]
    lover.append(purchase("c13", t, [item("y", "misc", "10.00")], coupon_code="SAVE5"))
    await apply(sm, hunter + lover)
    assert (await profile(sm, "c12"))["discount_affinity"] == "deal_hunter"
    c13 = await profile(sm, "c13")
    assert c13["discount_affinity"] == "discount_lover"


async def test_rfm_quintiles_and_value_tiers_refreshed_by_the_sweep(db):
    _, sm = db
    evs = []
    for n in range(10):
        for k in range(n + 1):
            evs.append(
                purchase(
                    f"r{n}",
                    NOW - timedelta(days=5 * (10 - n) + k),
                    [item("x", "misc", f"{10 * (n + 1)}.00", cost="5.00")],
                )
            )
    evs.append(
        purchase(
            "r-loss",
            NOW - timedelta(days=3),
            [item("z", "misc", "10.00", discount="9.50", cost="5.00")],
        )
    )
    await apply(sm, evs)
    async with session_scope(sm) as s:
        await sweep_rfm(s, NOW)
    top, bottom, loss = (
        await profile(sm, "r9"),
        await profile(sm, "r0"),
        await profile(sm, "r-loss"),
    )
    assert (top["rfm_r"], top["rfm_f"], top["rfm_m"]) == (5, 5, 5) and top["rfm_group"] == "champions"
    assert bottom["rfm_f"] == 1 and bottom["rfm_r"] == 1
    assert top["value_tier"] == "core" and loss["value_tier"] == "unprofitable"
    assert (await profile(sm, "r4"))["value_tier"] == "middle"


async def test_shuffled_and_duplicated_histories_give_identical_profiles(db, make_database):
    _, sm = db
    rng = random.Random(7)
    evs = []
    for c in range(5):
        for k in range(12):
            at = NOW - timedelta(days=rng.randint(0, 200), hours=rng.randint(0, 23))
            evs.append(
                purchase(
                    f"s{c}",
                    at,
                    [
                        item(
                            rng.choice(["wine-a", "wine-b", "beer"]),
                            rng.choice(["wine", "beer"]),
                            "10.00",
                            size=rng.choice(["S", "M"]),
                            color=rng.choice(["red", "white"]),
                        )
                    ],
                    order_id=f"s{c}-{k}",
                )
            )
        evs.append(event("customer_updated", f"s{c}", NOW - timedelta(days=50), {"first_name": f"N{c}"}))
        evs.append(refund(f"s{c}", NOW - timedelta(days=1), f"s{c}-3", "5.00"))
    await apply(sm, evs)
    async with sm() as s:
        first = [await ProfileRepository(s).get(f"s{c}", now=NOW) for c in range(5)]
    shuffled = evs[:] + evs[:10]
    rng.shuffle(shuffled)
    # A second database gets the same events shuffled, some twice, in small batches
    # (without the inbox, so duplicates reach the domain).
    engine = create_engine(await make_database("segmentation"), pool_size=2)
    sm2 = create_sessionmaker(engine)
    try:
        for i in range(0, len(shuffled), 7):
            await apply(sm2, shuffled[i : i + 7])
        async with sm2() as s:
            again = [await ProfileRepository(s).get(f"s{c}", now=NOW) for c in range(5)]
    finally:
        await engine.dispose()
    for a, b in zip(first, again, strict=True):
        a.pop("updated_at"), b.pop("updated_at")
        assert a == b


async def test_malformed_events_are_poison_not_half_applied(db):
    import pytest

    from crm_common.consumer import PoisonMessage

    _, sm = db
    good = purchase("p1", NOW, [item("x", "misc", "1.00")])
    no_time = dict(good, id="pos:bad1")
    no_time.pop("occurred_at")
    bad_props = event("purchase", "p1", NOW, {"order_id": "o", "items": [], "total": "-1", "currency": "EUR"})
    for bad in (no_time, bad_props, dict(good, id="pos:bad3", type="teleport")):
        with pytest.raises(PoisonMessage):
            await apply(sm, [good, bad])
    assert await profile(sm, "p1") is None  # the batch rolled back as a whole
