"""The HTTP API in-process: concurrency on one account, idempotency, validation of hostile input."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest_asyncio
from sqlalchemy import text

from crm_common.testing.helpers import eventually, read_topic, run_app
from loyalty.app import create_app
from loyalty.settings import TOPIC_LOYALTY, Settings

from . import factories as f
from .conftest import apply, check_invariants

D = Decimal


@pytest_asyncio.fixture(loop_scope="session")
async def api(db, broker, topic_prefix, clock) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    url, sm = db
    settings = Settings(
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=topic_prefix,
        consumers_enabled=False,
        sweeps_enabled=False,
        log_json=False,
        db_pool_size=10,
    )
    async with run_app(create_app(settings, clock=clock)) as client:
        r = await client.put("/v1/programme", json=f.SCENARIO4_PROGRAMME)
        assert r.status_code == 200, r.text
        yield client, sm


async def test_fifty_concurrent_redemptions_on_one_account_never_overspend(api):
    client, sm = api
    r = await client.post(
        "/v1/accounts/c1/adjustments", json={"adjustment_id": "a1", "points": "1000", "reason": "opening balance"}
    )
    assert r.status_code == 201, r.text
    # 25 distinct ids, each sent twice at once: 50 requests asking 100 points each on a 1,000-point account
    bodies = [
        {"redemption_id": f"r{i % 25}", "customer_id": "c1", "check_amount": "1000", "points": "100"} for i in range(50)
    ]
    responses = await asyncio.gather(*(client.post("/v1/redemptions", json=b) for b in bodies))
    assert Counter(r.status_code for r in responses) <= Counter({201: 10, 200: 10, 409: 40})
    ok = {r.json()["redemption_id"]: r.json() for r in responses if r.status_code in (200, 201)}
    assert sum(D(v["points_applied"]) for v in ok.values()) == D("1000")
    assert len(ok) == 10
    assert all(r.json()["error"]["code"] == "insufficient_points" for r in responses if r.status_code == 409)
    account = (await client.get("/v1/accounts/c1")).json()
    assert D(account["balance"]) == 0 and account["lots"] == []
    assert await check_invariants(sm, "c1") == 0


async def test_redemption_replay_conflict_cancel_and_reads_over_http(api):
    client, _ = api
    await client.post("/v1/accounts/c2/adjustments", json={"adjustment_id": "a2", "points": "5000", "reason": "x"})
    body = {"redemption_id": "rx", "customer_id": "c2", "check_amount": "50.00"}
    first = await client.post("/v1/redemptions", json=body)
    again = await client.post("/v1/redemptions", json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json() == again.json()
    assert first.json()["points_applied"] == "1500.00" and first.json()["money_applied"] == "15.00"
    clash = await client.post("/v1/redemptions", json={**body, "check_amount": "60"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "idempotency_conflict"
    cancelled = await client.post("/v1/redemptions/rx/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert (await client.get("/v1/redemptions/rx")).json()["points_returned"] == "1500.00"
    account = (await client.get("/v1/accounts/c2")).json()
    assert D(account["balance"]) == D("5000") and account["referral_code"]
    ledger = (await client.get("/v1/accounts/c2/ledger", params={"limit": 2})).json()
    assert [e["kind"] for e in ledger["entries"]] == ["reversal", "redemption"] and ledger["next_before"]
    older = (await client.get("/v1/accounts/c2/ledger", params={"before": ledger["next_before"]})).json()
    assert [e["kind"] for e in older["entries"]] == ["adjustment"]
    referral = (await client.get("/v1/accounts/c2/referral")).json()
    assert referral["referral_code"] == account["referral_code"]
    report = (await client.get("/v1/reports/points")).json()
    assert report["months"][0]["adjusted"] == "5000.00"
    assert (await client.get("/v1/accounts/nobody")).status_code == 404
    assert (await client.post("/v1/redemptions/none/cancel")).status_code == 404
    missing = await client.post("/v1/redemptions", json={**body, "redemption_id": "ry", "customer_id": "nobody"})
    assert missing.status_code == 404


async def test_hostile_inputs_get_a_structured_4xx_naming_the_field(api):
    client, _ = api
    cases = [
        ("post", "/v1/redemptions", {"redemption_id": "a\x00b", "customer_id": "c", "check_amount": "1"}),
        ("post", "/v1/redemptions", {"redemption_id": "a", "customer_id": "c", "check_amount": "1e400"}),
        ("post", "/v1/redemptions", {"redemption_id": "a", "customer_id": "c", "check_amount": "-5"}),
        ("post", "/v1/redemptions", {"redemption_id": "a", "customer_id": "c", "check_amount": "NaN"}),
        ("post", "/v1/redemptions", {"redemption_id": "a", "customer_id": "c", "check_amount": "1", "x": 1}),
        ("post", "/v1/redemptions", {"redemption_id": "a" * 129, "customer_id": "c", "check_amount": "1"}),
        ("post", "/v1/redemptions", {"redemption_id": "a", "customer_id": "c", "check_amount": "1", "points": "0"}),
        ("post", "/v1/accounts/c9/adjustments", {"adjustment_id": "z", "points": "0", "reason": "r"}),
        ("post", "/v1/accounts/c9/adjustments", {"adjustment_id": "z", "points": "1", "reason": "   "}),
        ("post", "/v1/accounts/c9/adjustments", {"adjustment_id": "z", "points": "99999999999999999", "reason": "r"}),
        ("put", "/v1/programme", {**f.SCENARIO4_PROGRAMME, "base_rate": "2"}),
        ("put", "/v1/programme", {**f.SCENARIO4_PROGRAMME, "tiers": [{"name": "base", "min_spend": 1, "rate": 0}]}),
        ("put", "/v1/programme", {**f.SCENARIO4_PROGRAMME, "category_multipliers": {"a": {"b": {"c": 1}}}}),
        ("put", "/v1/programme", {**f.SCENARIO4_PROGRAMME, "expiry_days": 10, "reminder_days": 14}),
        ("get", "/v1/reports/points?from=2027-01-01&to=2026-01-01", None),
        ("get", "/v1/accounts/c1/ledger?limit=100000", None),
        ("get", "/v1/accounts/" + "x" * 200, None),
        ("get", "/v1/accounts/a%00b", None),
    ]
    for method, path, body in cases:
        r = await client.request(method, path, json=body)
        assert r.status_code in (404, 422), (path, body, r.status_code, r.text)
        assert r.json()["error"]["code"], r.text
    r = await client.post("/v1/redemptions", content=b"[" * 10_000, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["error"]["code"]
    # nothing was half-applied
    assert (await client.get("/v1/accounts/c9")).status_code == 404
    assert (await client.get("/v1/programme")).json()["config"]["base_rate"] == "0.01"


async def test_lone_surrogates_and_odd_unicode_are_refused_or_stored_never_a_500(api):
    client, _ = api
    raw = b'{"redemption_id": "r\\ud800", "customer_id": "c\\udfff", "check_amount": "1"}'
    r = await client.post("/v1/redemptions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    raw = b'{"adjustment_id": "a\\ud800", "points": "1", "reason": "x"}'
    r = await client.post("/v1/accounts/u1/adjustments", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    r = await client.post(
        "/v1/accounts/%F0%9F%98%80%E2%80%AE/adjustments",
        json={"adjustment_id": "\u202e\U0001f600", "points": "1", "reason": "\u00e9\u0301"},
    )
    assert r.status_code == 201, r.text
    assert (await client.get("/v1/accounts/%F0%9F%98%80%E2%80%AE")).json()["balance"] == "1.00"
    r = await client.get("/v1/accounts/%ED%A0%80")  # a surrogate encoded in the path: invalid UTF-8
    assert r.status_code in (404, 422)


async def test_one_statement_redemption_takes_oldest_lots_first_and_writes_ledger_lots_and_outbox(
    api, clock, broker, topic_prefix
):
    """The common case runs in migration 0003's SQL function: it must do what the Python ledger does."""
    client, sm = api
    # The older lot has the larger id, so id order and age order disagree.
    r = await client.post(
        "/v1/accounts/c7/adjustments", json={"adjustment_id": "zz-old", "points": "30", "reason": "x"}
    )
    assert r.status_code == 201, r.text
    clock.advance(days=1)
    r = await client.post(
        "/v1/accounts/c7/adjustments", json={"adjustment_id": "aa-new", "points": "50", "reason": "x"}
    )
    assert r.status_code == 201, r.text
    body = {"redemption_id": "rf", "customer_id": "c7", "check_amount": "1000", "points": "40", "order_id": "o7"}
    first = await client.post("/v1/redemptions", json=body)
    assert first.status_code == 201, first.text
    assert first.json()["points_applied"] == "40.00" and first.json()["money_applied"] == "0.40"
    assert first.json()["balance"] == "40.00" and first.json()["status"] == "applied"
    again = await client.post("/v1/redemptions", json=body)
    assert again.status_code == 200 and again.json() == first.json()
    clash = await client.post("/v1/redemptions", json={**body, "points": "41"})
    assert clash.status_code == 409
    async with sm() as s:
        lots = dict((await s.execute(text("SELECT id, remaining FROM lots WHERE customer_id = 'c7'"))).all())
        taken = dict(
            (await s.execute(text("SELECT lot_id, points FROM redemption_lots WHERE redemption_id = 'rf'"))).all()
        )
        entry = (
            await s.execute(
                text("SELECT kind, points, balance_after, order_id, data FROM ledger WHERE ref = 'redemption:rf'")
            )
        ).one()
    assert lots == {"adjustment:zz-old": D("0.00"), "adjustment:aa-new": D("40.00")}
    assert taken == {"adjustment:zz-old": D("30.00"), "adjustment:aa-new": D("10.00")}
    assert entry[:4] == ("redemption", D("-40.00"), D("40.00"), "o7")
    assert entry[4] == {
        "money": "0.40",
        "check_amount": "1000",
        "lots": {"adjustment:zz-old": "30.00", "adjustment:aa-new": "10.00"},
    }

    # The outbox row went out through the relay (published, then deleted): read it on the topic.
    async def redeemed_messages() -> list[dict[str, Any]]:
        published = await read_topic(broker.bootstrap, topic_prefix + TOPIC_LOYALTY, timeout=2)
        return [m for m in published if m["type"] == "points.redeemed" and m["customer_id"] == "c7"]

    redeemed = await eventually(redeemed_messages, what="points.redeemed for c7 on the topic")
    assert len(redeemed) == 1
    assert redeemed[0]["id"] == "loyalty:points.redeemed:redemption:rf"
    assert (redeemed[0]["points"], redeemed[0]["balance"], redeemed[0]["data"]) == (
        "-40",
        "40.00",
        entry[4],
    )  # as the Python ledger writes it
    # Cancelling (the general path) gives the points back to the lots the function took them from.
    cancelled = await client.post("/v1/redemptions/rf/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["points_returned"] == "40.00"
    assert D((await client.get("/v1/accounts/c7")).json()["balance"]) == D("80")
    assert await check_invariants(sm, "c7") == D("80")


async def test_points_debt_of_a_refund_beyond_the_balance_is_shown_and_netted_over_http(api, clock):
    """QA's repro through the API: redeem, refund the order whose points were spent, then the other one."""
    client, sm = api
    r = await client.put("/v1/programme", json={**f.SCENARIO4_PROGRAMME, "tiers": []})  # 1% for everyone
    assert r.status_code == 200, r.text
    now = clock.now()
    await apply(sm, now, f.purchase("q1", "A", "1000.00", now, category="wine"))
    r = await client.post(
        "/v1/redemptions", json={"redemption_id": "R", "customer_id": "q1", "check_amount": "100.00", "points": "500"}
    )
    assert r.status_code == 201 and (r.json()["points_applied"], r.json()["balance"]) == ("500.00", "500.00")
    await apply(
        sm,
        now,
        f.purchase("q1", "B", "100.00", now, category="wine", redemption_id="R", points_redeemed="500.00"),
    )
    await apply(sm, now, f.refund("q1", "A", "1000.00", now))
    account = (await client.get("/v1/accounts/q1")).json()
    assert (account["balance"], account["points_debt"]) == ("0.00", "405.00")
    newest = (await client.get("/v1/accounts/q1/ledger", params={"limit": 1})).json()["entries"][0]
    assert (newest["kind"], newest["points"], newest["debt_change"]) == ("reversal", "-595.00", "405.00")
    await apply(sm, now, f.refund("q1", "B", "100.00", now))
    account = (await client.get("/v1/accounts/q1")).json()
    assert (account["balance"], account["points_debt"], account["lots"]) == ("0.00", "0.00", [])
    ledger = (await client.get("/v1/accounts/q1/ledger")).json()["entries"]
    assert [(e["kind"], e["points"], e["debt_change"], e["balance_after"]) for e in reversed(ledger)][3:] == [
        ("reversal", "-595.00", "405.00", "0.00"),
        ("reversal", "500.00", "0.00", "500.00"),
        ("debt_settlement", "-405.00", "-405.00", "95.00"),
        ("reversal", "-95.00", "0.00", "0.00"),
    ]
    assert await check_invariants(sm, "q1") == 0
