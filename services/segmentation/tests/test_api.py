"""The ops API: segment CRUD with pointed rule errors, dry runs, members, sizes, reports, built-ins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from crm_common.clock import ManualClock
from crm_common.contract.messages import DeliveryEvent
from crm_common.db import session_scope
from crm_common.testing.helpers import eventually, publish, run_app
from segmentation.app import create_app
from segmentation.builtin import BUILTIN_SEGMENTS
from segmentation.profiles import apply_events
from segmentation.settings import Settings

from .conftest import fetch_all
from .factories import event, item, purchase, records

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def settings(url, broker, prefix, *, consumers: bool = False) -> Settings:
    """Most API tests seed through the domain and need no consumer (joining a group takes seconds)."""
    return Settings(
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=prefix,
        sweeps_enabled=False,
        log_json=False,
        kafka_consumer_batch_timeout_ms=50,
        consumers_enabled=consumers,
    )


async def seed(sm, events, now=NOW):
    async with session_scope(sm) as s:
        await apply_events(session=s, records=records(events), now=now, decay_days=90)


async def test_segment_crud_dry_run_members_and_pointed_errors(db, broker, topic_prefix):
    url, sm = db
    await seed(
        sm,
        [purchase(f"m{i:02d}", NOW - timedelta(days=i), [item("x", "misc", f"{i + 1}.00")]) for i in range(25)],
    )
    app = create_app(settings(url, broker, topic_prefix), clock=ManualClock(NOW))
    async with run_app(app) as client:
        bad = {
            "key": "big",
            "name": "Big",
            "rule": {
                "all": [
                    {"attr": "revenue", "op": ">=", "value": 10},
                    {"attr": "revenue", "op": "between", "value": 1},
                ]
            },
        }
        r = await client.post("/v1/segments", json=bad)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "invalid_rule"
        assert r.json()["error"]["details"]["errors"][0]["path"] == "rule.all[1].op"
        assert (await client.get("/v1/segments/big")).status_code == 404

        rule = {"attr": "revenue", "op": ">=", "value": 16}
        dry = (await client.post("/v1/segments/dry-run", json={"rule": rule, "sample": 3})).json()
        assert dry["count"] == 10 and dry["sample"] == ["m15", "m16", "m17"]

        r = await client.post("/v1/segments", json={"key": "big", "name": "Big", "rule": rule})
        assert r.status_code == 201 and r.json()["size"] == 10
        assert (
            await client.post("/v1/segments", json={"key": "big", "name": "Again", "rule": rule})
        ).status_code == 409

        page1 = (await client.get("/v1/segments/big/members", params={"limit": 4})).json()
        page2 = (
            await client.get("/v1/segments/big/members", params={"limit": 4, "cursor": page1["next_cursor"]})
        ).json()
        assert [m["customer_id"] for m in page1["items"] + page2["items"]] == [f"m{i}" for i in range(15, 23)]

        r = await client.patch("/v1/segments/big", json={"rule": {"attr": "revenue", "op": ">=", "value": 24}})
        assert r.status_code == 200 and r.json()["size"] == 2 and r.json()["version"] == 2
        for same in ({}, {"rule": {"attr": "revenue", "op": ">=", "value": 24}}, {"name": r.json()["name"]}):
            again = await client.patch("/v1/segments/big", json=same)
            assert again.status_code == 200 and again.json()["version"] == 2, (same, again.text)
        r = await client.patch("/v1/segments/big", json={"rule": {"not": {"attr": "revenue"}}})
        assert r.status_code == 422 and r.json()["error"]["details"]["errors"][0]["path"] == "rule.not.op"

        assert (await client.delete("/v1/segments/big")).status_code == 204
        assert (await client.get("/v1/segments/big")).status_code == 404
        changes = await fetch_all(
            sm,
            "SELECT change, count(*) AS n FROM membership_log WHERE segment_id NOT LIKE 'builtin:%' GROUP BY 1 ORDER BY 1",
        )
        assert changes == [{"change": "entered", "n": 10}, {"change": "exited", "n": 10}]
        outbox = await fetch_all(sm, "SELECT count(*) AS n FROM membership_log l")
        assert outbox[0]["n"] >= 20


async def test_hostile_inputs_get_4xx_not_500(db, broker, topic_prefix):
    url, _ = db
    app = create_app(settings(url, broker, topic_prefix), clock=ManualClock(NOW))
    async with run_app(app) as client:
        deep: dict = {"attr": "orders", "op": ">", "value": 0}
        for _ in range(200):
            deep = {"not": deep}
        cases = [
            ("POST", "/v1/segments", {"key": "x", "name": "x", "rule": deep}),
            (
                "POST",
                "/v1/segments",
                {"key": "Bad Key!", "name": "x", "rule": {"attr": "orders", "op": ">", "value": 0}},
            ),
            ("POST", "/v1/segments", {"key": "x", "name": "x", "rule": [1]}),
            (
                "POST",
                "/v1/segments/dry-run",
                '{"rule": {"attr": "orders", "op": ">", "value": 1e999}}',
            ),
            ("POST", "/v1/segments/dry-run", '{"rule": ' + '{"not": ' * 5000 + "{}" + "}" * 5001),
            ("POST", "/v1/segments/dry-run", '{"rule": ' + '{"not": ' * 100_000 + "{}" + "}" * 100_001),
            (
                "POST",
                "/v1/segments/dry-run",
                {"rule": {"attr": "traits.city", "op": "=", "value": "é\u202e\x00"}},
            ),
            (
                "POST",
                "/v1/segments/dry-run",
                {"rule": {"purchases": {"within_days": 10**30}, "op": ">", "value": 1}},
            ),
            ("GET", "/v1/profiles/a%00b", None),
            ("GET", "/v1/segments/big/members?limit=100000000000000000000", None),
        ]
        for method, path, body in cases:
            if isinstance(body, str):
                r = await client.request(method, path, content=body, headers={"content-type": "application/json"})
            else:
                r = (
                    await client.request(method, path, json=body)
                    if body is not None
                    else await client.request(method, path)
                )
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert (await client.get("/v1/profiles/nobody")).status_code == 404


async def test_builtin_segments_install_once_and_stay_edited(db, broker, topic_prefix):
    url, _sm = db
    app = create_app(settings(url, broker, topic_prefix), clock=ManualClock(NOW))
    async with run_app(app) as client:
        keys = [s["key"] for s in (await client.get("/v1/segments")).json()]
        assert {b["key"] for b in BUILTIN_SEGMENTS} <= set(keys)
        assert {
            "friday_wine_lovers",
            "lapsed_regulars",
            "lost_regulars",
            "core",
            "deal_hunters",
        } <= set(keys)
        r = await client.patch(
            "/v1/segments/lapsed_regulars",
            json={
                "rule": {
                    "all": [
                        {"attr": "orders", "op": ">=", "value": 4},
                        {"attr": "days_since_last_purchase", "op": ">", "value": 90},
                    ]
                }
            },
        )
        assert r.status_code == 200
    async with run_app(create_app(settings(url, broker, topic_prefix), clock=ManualClock(NOW))) as client:
        segs = (await client.get("/v1/segments")).json()
        assert len(segs) == len(keys)
        lapsed = next(s for s in segs if s["key"] == "lapsed_regulars")
        assert lapsed["rule"]["all"][0]["value"] == 4 and lapsed["builtin"] is True


async def test_lapsed_regulars_enter_when_90_days_pass_without_an_order(db, broker, topic_prefix):
    url, sm = db
    clock = ManualClock(NOW)
    start = NOW - timedelta(days=150)
    evs = [
        purchase("reg", start + timedelta(days=30 * k), [item("clean", "cleaning", "50.00")]) for k in range(4)
    ]  # last: 60 days ago
    evs += [purchase("two", start + timedelta(days=30 * k), [item("clean", "cleaning", "50.00")]) for k in range(2)]
    evs.append(event("feedback", "reg", start + timedelta(days=91), {"rating": 1, "topic": "quality"}))
    app = create_app(settings(url, broker, topic_prefix), clock=clock)
    async with run_app(app) as client:
        await seed(sm, evs)
        assert (await client.get("/v1/segments/lapsed_regulars/members")).json()["items"] == []
        clock.advance(days=31)
        r = await client.post("/v1/ops/sweeps/segments")
        assert r.json()["result"]["segments"]["lapsed_regulars"] == {"entered": 1, "exited": 0}
        assert [
            m["customer_id"] for m in (await client.get("/v1/segments/lapsed_regulars/members")).json()["items"]
        ] == ["reg"]
        digest = await fetch_all(
            sm,
            "SELECT convert_from(value, 'UTF8')::jsonb -> 'profile' AS p FROM outbox "
            "WHERE convert_from(value, 'UTF8')::jsonb ->> 'segment_key' = 'lapsed_regulars'",
        )
        assert (
            digest
            and digest[0]["p"]["last_feedback_topic"] == "quality"
            and digest[0]["p"]["last_feedback_rating"] == 1
        )
        # coming back takes her out at once, in the consumer path
        await seed(
            sm,
            [purchase("reg", clock.now(), [item("clean", "cleaning", "50.00")])],
            now=clock.now(),
        )
        assert (await client.get("/v1/segments/lapsed_regulars/members")).json()["items"] == []


async def test_reports_pareto_rfm_and_acquisition(db, broker, topic_prefix):
    url, sm = db
    evs = []
    for i in range(10):
        cid = f"p{i}"
        evs.append(
            event(
                "customer_updated",
                cid,
                NOW - timedelta(days=300),
                {"acquisition_channel": "web" if i < 5 else "store"},
            )
        )
        amount = "1000.00" if i < 2 else "100.00"
        for k in range(1 if i % 2 else 3):
            evs.append(
                purchase(
                    cid,
                    NOW - timedelta(days=10 + 20 * k + i),
                    [item("x", "misc", amount, cost="10.00")],
                )
            )
    await seed(sm, evs)
    app = create_app(settings(url, broker, topic_prefix), clock=ManualClock(NOW))
    async with run_app(app) as client:
        assert (await client.post("/v1/ops/sweeps/rfm")).status_code == 200
        pareto = (await client.get("/v1/reports/pareto")).json()
        top20 = next(s for s in pareto["shares"] if s["top_percent"] == 20)
        assert pareto["customers"] == 10
        assert Decimal(str(top20["revenue"])) == Decimal("4000")  # p0 (3 x 1000) and p1 (1 x 1000)
        assert abs(top20["share"] - 4000 / 5600) < 1e-9
        rfm = (await client.get("/v1/reports/rfm")).json()
        assert sum(c["customers"] for c in rfm["cells"]) == 10 and rfm["cut_points"] is not None
        acq = {r["channel"]: r for r in (await client.get("/v1/reports/acquisition")).json()}
        assert acq["web"]["buyers"] == 5 and acq["web"]["repeat_rate"] == 3 / 5
        assert Decimal(str(acq["store"]["revenue"])) == Decimal("900")  # p5..p9: 1 + 3 + 1 + 3 + 1 orders of 100
        profile = (await client.get("/v1/profiles/p0")).json()
        assert profile["value_tier"] == "core" and profile["rfm_group"] is not None


async def test_delivery_outcomes_build_engagement_per_channel(db, broker, topic_prefix):
    url, sm = db
    await seed(sm, [event("customer_updated", "e1", NOW, {"first_name": "E"})])
    app = create_app(settings(url, broker, topic_prefix, consumers=True), clock=ManualClock(NOW))
    deliveries = [
        DeliveryEvent(
            id=f"d{i}",
            customer_id="e1",
            occurred_at=NOW,
            message_id=f"msg{i // 3}",
            status=s,
            channel=ch,
        ).model_dump(mode="json")
        for i, (s, ch) in enumerate(
            [
                ("sent", "email"),
                ("opened", "email"),
                ("clicked", "email"),
                ("sent", "email"),
                ("opened", "email"),
                ("opened", "email"),
                ("sent", "sms"),
                ("delivered", "sms"),
                ("failed", "sms"),
            ]
        )
    ]
    async with run_app(app) as client:
        await publish(broker.bootstrap, topic_prefix + "crm.deliveries.v1", deliveries + deliveries[:3])

        async def engaged():
            return (await client.get("/v1/profiles/e1")).json()["engagement"].get("sms")

        await eventually(engaged, timeout=30, what="engagement")
        await eventually(lambda: _settled(client), timeout=10)
        engagement = (await client.get("/v1/profiles/e1")).json()["engagement"]
        assert engagement == {
            "email": {"sent": 2, "opened": 2, "clicked": 1},
            "sms": {"sent": 1, "delivered": 1, "failed": 1},
        }


async def _settled(client) -> bool:
    pipe = (await client.get("/v1/ops/pipeline")).json()
    c = next(c for c in pipe["consumers"] if c["name"] == "segmentation")
    return c["applied"] + c["duplicates"] >= 12
