"""Through the real broker: the events and segments consumers, the outbox relay, the expiry sweep; scenario 4."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest_asyncio

from crm_common.testing.helpers import eventually, publish, read_topic, run_app
from loyalty.app import create_app
from loyalty.settings import Settings

from . import factories as f
from .conftest import check_invariants

D = Decimal


@pytest_asyncio.fixture(loop_scope="session")
async def app(db, broker, topic_prefix, clock) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    url, sm = db
    settings = Settings(
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=topic_prefix,
        sweeps_enabled=False,
        log_json=False,
        kafka_consumer_batch_timeout_ms=50,
    )
    async with run_app(create_app(settings, clock=clock)) as client:
        assert (await client.put("/v1/programme", json=f.SCENARIO4_PROGRAMME)).status_code == 200
        yield client, sm


async def balance_is(client: httpx.AsyncClient, customer_id: str, expected: str) -> bool:
    r = await client.get(f"/v1/accounts/{customer_id}")
    return r.status_code == 200 and D(r.json()["balance"]) == D(expected)


async def test_duplicated_purchase_event_accrues_once_and_a_broken_one_goes_to_the_dlq(
    app, broker, topic_prefix, clock
):
    client, sm = app
    events = topic_prefix + "crm.events.v1"
    p = f.purchase("dup", "o1", "100", clock.now(), event_id="e1")
    broken = f.purchase("dup", "o2", "100", clock.now(), event_id="e2")
    broken["properties"]["total"] = "-1"
    later = f.purchase("dup", "o3", "10", clock.now(), event_id="e3")
    await publish(broker.bootstrap, events, [p, p, broken, p, later])
    await publish(broker.bootstrap, events, [p])
    await eventually(lambda: balance_is(client, "dup", "110"), timeout=40, what="accrual of o1 and o3")
    dlq = await read_topic(broker.bootstrap, topic_prefix + "crm.dlq.v1", min_count=1)
    assert [m["message_id"] for m in dlq] == ["pos:e2"]
    ledger = (await client.get("/v1/accounts/dup/ledger")).json()["entries"]
    assert sorted(e["order_id"] for e in ledger) == ["o1", "o3"]
    accrued = [
        m
        for m in await read_topic(broker.bootstrap, topic_prefix + "crm.loyalty.v1", min_count=2)
        if m["type"] == "points.accrued"
    ]
    assert len(accrued) == 2
    await check_invariants(sm, "dup")


async def test_scenario_4_base_rate_tiers_goals_redemption_refund_reminder_and_expiry(app, broker, topic_prefix, clock):
    client, sm = app
    t0 = clock.now()
    events, segments = topic_prefix + "crm.events.v1", topic_prefix + "crm.segments.v1"

    # Base accrual 1% of the paid amount; the top tier (12-month spend >= 1000) earns 3%.
    await publish(
        broker.bootstrap,
        events,
        [
            f.purchase("ann", "a1", "100", t0),
            f.purchase("vip", "v1", "800", t0),
            f.purchase("vip", "v2", "400", t0 + timedelta(minutes=1)),
        ],
    )
    await eventually(lambda: balance_is(client, "ann", "100"), timeout=40, what="ann's accrual")
    await eventually(lambda: balance_is(client, "vip", "2000"), what="vip: 800 at 1% + 400 at 3%")
    assert (await client.get("/v1/accounts/vip")).json()["tier"] == "top"

    # Ann's visits dropped: a goal "3 purchases in 30 days" worth 300 points, offered by message.
    clock.advance(days=1)
    await publish(broker.bootstrap, segments, [f.segment_entered("ann", "visits_dropped", clock.now(), "seg-1")] * 2)

    async def goal_assigned() -> bool:
        return bool((await client.get("/v1/accounts/ann")).json()["goals"])

    await eventually(goal_assigned, what="goal assigned")
    for i in range(4):
        clock.advance(days=2)
        await publish(broker.bootstrap, events, [f.purchase("ann", f"g{i}", "10", clock.now())])
    await eventually(lambda: balance_is(client, "ann", str(100 + 4 * 10 + 300)), what="goal bonus, once")
    goal = (await client.get("/v1/accounts/ann")).json()["goals"][0]
    assert goal["status"] == "completed" and goal["progress"] == 3

    # Redemption at the POS: up to 30% of the check; a repeat with the same id applies once.
    body = {"redemption_id": "pos-1", "customer_id": "ann", "check_amount": "50", "points": "200"}
    first = await client.post("/v1/redemptions", json=body)
    again = await client.post("/v1/redemptions", json=body)
    assert (first.status_code, again.status_code) == (201, 200) and first.json() == again.json()
    assert first.json()["money_applied"] == "2.00" and D(first.json()["balance"]) == D("240")
    big = await client.post("/v1/redemptions", json={**body, "redemption_id": "pos-2", "points": "5000"})
    assert big.json()["points_applied"] == "240.00"  # capped by the balance (the 30% cap here is 1500)
    assert (await client.post("/v1/redemptions/pos-2/cancel")).json()["status"] == "cancelled"
    # The purchase reconciles the redemption; 48 of 50 paid in money accrues 48 points.
    await publish(
        broker.bootstrap,
        events,
        [
            f.purchase("ann", "r1", "50", clock.now(), redemption_id="pos-1", points_redeemed="200"),
        ],
    )
    await eventually(lambda: balance_is(client, "ann", str(240 + 48)), what="accrual on the paid amount")
    # A refund returns the redeemed points and reverses the accrued ones.
    await publish(broker.bootstrap, events, [f.refund("ann", "r1", "48", clock.now())])
    await eventually(lambda: balance_is(client, "ann", "440"), what="refund reversal")

    # 14 days before the oldest points expire: one transactional reminder with the amount and the date.
    first_expiry = t0 + timedelta(days=180)
    clock.set(first_expiry - timedelta(days=14))
    for _ in range(2):
        r = await client.post("/v1/ops/sweeps/expiry")
        assert r.status_code == 200 and r.json()["ran"]

    def reminders(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [m for m in msgs if m.get("template") == "points_expiring" and m["customer_id"] == "ann"]

    msgs = await read_topic(broker.bootstrap, topic_prefix + "crm.messages.v1", min_count=2)
    offers = [m for m in msgs if m.get("template") == "loyalty_goal_offer"]
    assert len(offers) == 1 and offers[0]["variables"]["reward_points"] == "300.00"
    reminder = reminders(msgs)
    assert len(reminder) == 1, reminder
    assert reminder[0]["kind"] == "transactional"
    assert reminder[0]["variables"]["expires_on"] == first_expiry.date().isoformat()
    assert D(reminder[0]["variables"]["points"]) > 0

    # After expiry the ledger shows it and the balance is never negative.
    clock.set(t0 + timedelta(days=200))
    result = (await client.post("/v1/ops/sweeps/expiry")).json()["result"]
    assert result["lots_expired"] >= 1
    account = (await client.get("/v1/accounts/ann")).json()
    assert D(account["balance"]) == 0 and account["lots"] == []
    kinds = [e["kind"] for e in (await client.get("/v1/accounts/ann/ledger")).json()["entries"]]
    assert "expiry" in kinds and kinds.count("goal_bonus") == 1
    await check_invariants(sm, "ann")
    loyalty = await read_topic(broker.bootstrap, topic_prefix + "crm.loyalty.v1", min_count=10)
    types = {m["type"] for m in loyalty if m["customer_id"] in ("ann", "vip")}
    assert {
        "points.accrued",
        "tier.changed",
        "goal.assigned",
        "goal.completed",
        "points.redeemed",
        "points.reversed",
        "points.expired",
        "redemption.cancelled",
    } <= types
    assert len([m for m in loyalty if m["type"] == "goal.completed"]) == 1


async def test_a_points_multiplier_offer_on_crm_messages_doubles_the_next_accrual(app, broker, topic_prefix, clock):
    client, sm = app
    t0 = clock.now()
    messages = topic_prefix + "crm.messages.v1"
    offer = f.offer_request("mx", "ofr-mx", t0, multiplier="2", valid_until=(t0 + timedelta(days=7)).date().isoformat())
    broken = f.offer_request("mx", "ofr-broken", t0, multiplier="none")
    other = f.offer_request("mx", "ofr-percent", t0, offer_kind="percent")
    await publish(broker.bootstrap, messages, [offer, other, broken, offer])
    await publish(
        broker.bootstrap, topic_prefix + "crm.events.v1", [f.purchase("mx", "m1", "100", t0 + timedelta(minutes=1))]
    )
    await eventually(lambda: balance_is(client, "mx", "200"), timeout=40, what="the doubled accrual")
    dlq = await read_topic(broker.bootstrap, topic_prefix + "crm.dlq.v1", min_count=1)
    assert "ofr-broken" in [m["message_id"] for m in dlq]
    bonus = [
        m
        for m in await read_topic(broker.bootstrap, topic_prefix + "crm.loyalty.v1", min_count=2)
        if m["data"].get("reason") == "offer_bonus"
    ]
    assert [(m["customer_id"], D(m["points"]), m["data"]["campaign_id"]) for m in bonus] == [("mx", D("100"), "cmp-1")]
    await check_invariants(sm, "mx")
