"""The service end to end: real broker, real PostgreSQL, the consumer, the sweep, the outbox and the API."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from crm_common.clock import ManualClock
from crm_common.contract.messages import SegmentMembershipChanged
from crm_common.kafka import ensure_topics
from crm_common.settings import ALL_TOPICS
from crm_common.testing.helpers import eventually, publish, read_topic, run_app, unique
from segmentation.app import create_app
from segmentation.settings import Settings

from .conftest import fetch_all
from .factories import event, item, purchase

FRIDAY = datetime(2026, 3, 6, 18, 0, tzinfo=UTC)


def settings(url: str, broker: Any, prefix: str) -> Settings:
    return Settings(
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=prefix,
        sweeps_enabled=False,
        log_json=False,
        kafka_consumer_batch_timeout_ms=50,
    )


async def _applied(client, n: int) -> bool:
    pipe = (await client.get("/v1/ops/pipeline")).json()
    return (
        next(c for c in pipe["consumers"] if c["name"] == "segmentation")["applied"]
        + next(c for c in pipe["consumers"] if c["name"] == "segmentation")["duplicates"]
        >= n
    )


async def _members(client, key: str) -> list[str]:
    page = (await client.get(f"/v1/segments/{key}/members", params={"limit": 1000})).json()
    return [m["customer_id"] for m in page["items"]]


async def test_friday_wine_lovers_fill_as_purchases_arrive_and_empty_as_time_passes(db, broker, topic_prefix):
    url, sm = db
    clock = ManualClock(FRIDAY - timedelta(days=14) + timedelta(hours=1))
    topic = topic_prefix + "crm.events.v1"
    app = create_app(settings(url, broker, topic_prefix), clock=clock)
    async with run_app(app) as client:
        wine = {"sku": "chateau-9", "name": "Chateau Neuf 2019"}
        history = [
            event(
                "customer_updated",
                "ann",
                FRIDAY - timedelta(days=30),
                {"first_name": "Ann", "consents": {"email": True}},
            ),
            purchase(
                "ann",
                FRIDAY - timedelta(days=14),
                [
                    item(wine["sku"], "wine", "10.00", name=wine["name"]),
                    item("bread", "bakery", "2.00"),
                ],
            ),
            purchase(
                "ann",
                FRIDAY - timedelta(days=7),
                [item(wine["sku"], "wine", "10.00", name=wine["name"])],
            ),
            # Bob buys wine on Saturdays only; Cy buys beer on Fridays.
            *[
                purchase("bob", FRIDAY - timedelta(days=7 * k - 1), [item("rose-1", "wine", "8.00")])
                for k in range(1, 4)
            ],
            *[purchase("cy", FRIDAY - timedelta(days=7 * k), [item("lager", "beer", "3.00")]) for k in range(0, 3)],
        ]
        await publish(broker.bootstrap, topic, history)
        await eventually(lambda: _applied(client, len(history)), timeout=30, what="history applied")
        assert await _members(client, "friday_wine_lovers") == []

        clock.set(FRIDAY + timedelta(hours=1))
        third = purchase("ann", FRIDAY, [item(wine["sku"], "wine", "10.00", name=wine["name"])])
        await publish(broker.bootstrap, topic, [third])
        await eventually(lambda: _members(client, "friday_wine_lovers"), timeout=20, what="ann entered")
        assert await _members(client, "friday_wine_lovers") == ["ann"]

        profile = (await client.get("/v1/profiles/ann")).json()
        assert profile["favourite_product"]["sku"] == "chateau-9"
        assert "friday_wine_lovers" in [s["key"] for s in profile["segments"]]

        entered = await read_topic(broker.bootstrap, topic_prefix + "crm.segments.v1", min_count=1)
        msg = SegmentMembershipChanged.model_validate(
            next(m for m in entered if m["segment_key"] == "friday_wine_lovers")
        )
        assert (msg.type, msg.customer_id) == ("segment.entered", "ann")
        assert msg.profile.first_name == "Ann"
        assert msg.profile.favourite_product["name"] == "Chateau Neuf 2019"
        assert msg.profile.favourite_category == "wine"

        # Six weeks without wine: the 8-week window slides past her first Friday; the sweep takes her out.
        clock.set(FRIDAY + timedelta(days=43))
        swept = (await client.post("/v1/ops/sweeps/segments")).json()
        assert swept["result"]["segments"]["friday_wine_lovers"] == {"entered": 0, "exited": 1}
        assert await _members(client, "friday_wine_lovers") == []
        sizes = (await client.get("/v1/segments/friday_wine_lovers/sizes")).json()
        assert sizes[0]["size"] == 0

        # Every logged change was published (outbox relayed), none without the other.
        log = await fetch_all(sm, "SELECT id, segment_id, customer_id, change FROM membership_log")

        async def all_published() -> bool:
            msgs = await read_topic(broker.bootstrap, topic_prefix + "crm.segments.v1", min_count=len(log), idle=0.2)
            return {m["id"] for m in msgs} == {f"segchg:{r['id']}" for r in log}

        await eventually(all_published, timeout=20, what="every membership change on crm.segments.v1")
        exits = [
            m
            for m in await read_topic(broker.bootstrap, topic_prefix + "crm.segments.v1", min_count=len(log))
            if m["type"] == "segment.exited" and m["segment_key"] == "friday_wine_lovers"
        ]
        assert [m["customer_id"] for m in exits] == ["ann"]


def _history(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    evs = []
    for c in range(25):
        cid = f"h{c:02d}"
        evs.append(
            event(
                "customer_updated",
                cid,
                FRIDAY - timedelta(days=200),
                {"first_name": f"N{c}", "acquisition_channel": rng.choice(["web", "store"])},
            )
        )
        for k in range(rng.randint(1, 9)):
            at = FRIDAY - timedelta(days=rng.randint(0, 150), hours=rng.randint(0, 12))
            cat = rng.choice(["wine", "beer", "cleaning"])
            evs.append(
                purchase(
                    cid,
                    at,
                    [
                        item(
                            f"{cat}-{rng.randint(1, 3)}",
                            cat,
                            "10.00",
                            discount=rng.choice(["0", "2.00"]),
                        )
                    ],
                    order_id=f"{cid}-{k}",
                )
            )
        if rng.random() < 0.3:
            evs.append(
                event(
                    "refund",
                    cid,
                    FRIDAY - timedelta(days=1),
                    {"order_id": f"{cid}-0", "amount": "10.00"},
                )
            )
        if rng.random() < 0.3:
            evs.append(
                event(
                    "feedback",
                    cid,
                    FRIDAY - timedelta(days=2),
                    {"rating": rng.randint(1, 5), "topic": "quality"},
                )
            )
    return evs


async def _snapshot(sm) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    profiles = await fetch_all(sm, "SELECT * FROM profiles ORDER BY customer_id")
    for p in profiles:
        p.pop("updated_at")
    members = await fetch_all(
        sm,
        "SELECT s.key, m.customer_id FROM memberships m JOIN segments s ON s.id = m.segment_id ORDER BY 1, 2",
    )
    return profiles, members


async def test_replaying_twice_or_shuffled_yields_identical_profiles_and_memberships(
    db, broker, topic_prefix, make_database
):
    url, sm = db
    clock = ManualClock(FRIDAY + timedelta(hours=2))
    evs = _history(11)
    app = create_app(settings(url, broker, topic_prefix), clock=clock)
    async with run_app(app) as client:
        await publish(broker.bootstrap, topic_prefix + "crm.events.v1", evs)
        await eventually(lambda: _applied(client, len(evs)), timeout=30, what="history applied")
        in_order = await _snapshot(sm)
        await publish(broker.bootstrap, topic_prefix + "crm.events.v1", evs)  # the whole history again
        await eventually(lambda: _applied(client, 2 * len(evs)), timeout=30, what="replay consumed")
        assert await _snapshot(sm) == in_order
    assert any(in_order[1]), "the history should put somebody in a segment"

    # A second service instance with its own database and topics gets the events shuffled.
    prefix2 = unique("t") + "."
    await ensure_topics(broker.bootstrap, [prefix2 + t for t in ALL_TOPICS], partitions=3)
    url2 = await make_database("segmentation")
    shuffled = evs[:]
    random.Random(5).shuffle(shuffled)
    app2 = create_app(settings(url2, broker, prefix2), clock=clock)
    from crm_common.db import create_engine, create_sessionmaker

    engine2 = create_engine(url2, pool_size=2)
    try:
        async with run_app(app2) as client2:
            await publish(broker.bootstrap, prefix2 + "crm.events.v1", shuffled)
            await eventually(lambda: _applied(client2, len(evs)), timeout=30, what="shuffled history applied")
            assert await _snapshot(create_sessionmaker(engine2)) == in_order
    finally:
        await engine2.dispose()


async def test_membership_change_and_its_outbox_row_commit_or_roll_back_together(db):
    from segmentation.profiles import apply_events

    from .factories import records

    _, sm = db
    evs = [purchase("t1", FRIDAY - timedelta(days=7 * k), [item("wine-a", "wine", "10.00")]) for k in range(3)]
    async with sm() as s:
        await s.execute(
            text(
                "INSERT INTO segments (id, key, name, rule, created_at, updated_at) VALUES "
                '(\'s1\', \'wine3\', \'wine3\', \'{"attr": "orders", "op": ">=", "value": 3}\', now(), now())'
            )
        )
        await s.commit()
    async with sm() as s:
        await apply_events(session=s, records=records(evs), now=FRIDAY, decay_days=90)
        assert (await s.execute(text("SELECT count(*) FROM memberships"))).scalar() == 1
        assert (await s.execute(text("SELECT count(*) FROM outbox"))).scalar() == 1
        await s.rollback()
    assert await fetch_all(sm, "SELECT * FROM memberships") == []
    assert await fetch_all(sm, "SELECT * FROM outbox") == []
    async with sm() as s:
        await apply_events(session=s, records=records(evs), now=FRIDAY, decay_days=90)
        await s.commit()
    rows = await fetch_all(sm, "SELECT key, convert_from(value, 'UTF8') AS v FROM outbox")
    assert len(rows) == 1 and rows[0]["key"] == "t1"
    msg = SegmentMembershipChanged.model_validate_json(rows[0]["v"])
    assert (msg.type, msg.segment_key, msg.profile.orders) == ("segment.entered", "wine3", 3)
