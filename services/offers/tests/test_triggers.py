"""Triggers through the real broker: scenarios 2, 3, 5, 6 and 7 configured through the API, their
decisions and message requests asserted, and the "why" of every non-send."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from offers.settings import TOPIC_EVENTS, TOPIC_SEGMENTS

from . import factories as f

NO_GLOBAL = {"global_control_share": 0.0}


async def why(st, campaign_id: str, customer_id: str) -> dict:
    r = await st.offers.get(f"/v1/campaigns/{campaign_id}/why/{customer_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def test_scenario2_window_before_predicted_purchase_once_per_cycle(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_s2", "email")
        c = await st.create(
            f.campaign(
                "Shirts before the next purchase",
                {"kind": "purchase_window", "min_days": 7, "max_days": 14},
                "t_s2",
                offer={"kind": "free_delivery", "target": "favourite_category"},
                control_share=0,
            )
        )
        now = clock.now()

        def digest(days: float) -> dict:
            return {
                "predicted_next_purchase": (now + timedelta(days=days)).isoformat(),
                "first_name": "Max",
                "favourite_category": "shirts",
                "favourite_size": "M",
                "favourite_color": "white",
                "value_tier": "core",
            }

        await st.publish(
            TOPIC_SEGMENTS,
            [
                f.segment_entered("in_window", "core", now, digest(10)),
                f.segment_entered("later", "core", now, digest(20)),
                f.segment_entered("bought", "core", now, digest(10)),
                f.segment_entered("too_late", "core", now, digest(3)),
            ],
        )
        await st.publish(TOPIC_EVENTS, [f.purchase("bought", now + timedelta(hours=1))])

        async def cached() -> bool:
            rows = await st.sql("SELECT count(*) AS n FROM customers WHERE digest IS NOT NULL")
            bought = await st.sql(
                "SELECT 1 FROM customers WHERE customer_id = 'bought' AND last_purchase_at IS NOT NULL"
            )
            return rows[0]["n"] == 4 and bool(bought)

        from crm_common.testing.helpers import eventually

        await eventually(cached, what="digests and the purchase")
        clock.advance(hours=2)
        assert (await st.sweep("triggers"))["requested"] == 1
        assert await st.decisions(c["id"]) == {
            "in_window": "requested",
            "bought": "already_bought",
            "too_late": "outside_window",
        }
        # Not before the window, not twice in the cycle.
        assert (await st.sweep("triggers"))["requested"] == 0
        clock.advance(days=8)
        assert (await st.sweep("triggers"))["requested"] == 1
        decided = await st.decisions(c["id"])
        assert decided["later"] == "requested" and len(decided) == 4
        msgs = await st.requested(c["id"])
        assert sorted(m["customer_id"] for m in msgs) == ["in_window", "later"]
        v = msgs[0]["variables"]
        assert (v["category"], v["size"], v["discount"], v["first_name"]) == ("shirts", "M", "free delivery", "Max")
        assert "bought" in (await why(st, c["id"], "bought"))["sentence"]
        assert "window" in (await why(st, c["id"], "too_late"))["sentence"]
        await campaign_decisions_match_each_customers(st, c["id"], ["in_window", "later", "bought", "too_late"])


async def campaign_decisions_match_each_customers(st, campaign_id: str, customers: list[str]) -> None:
    """GET /v1/campaigns/{id}/decisions, page by page, lists what each customer's decisions list."""
    pages, after = [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after is not None else {})
        r = await st.offers.get(f"/v1/campaigns/{campaign_id}/decisions", params=params)
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        after = r.json()["next_after"]
        if after is None:
            break
    listed = [d for page in pages for d in page]
    assert len(pages) >= 2 and all(len(page) <= 2 for page in pages)
    assert [d["id"] for d in listed] == sorted({d["id"] for d in listed})  # in the order made, none twice
    each = []
    for cid in customers:
        r = await st.offers.get(f"/v1/customers/{cid}/decisions", params={"campaign_id": campaign_id})
        each += [(d["customer_id"], d["occurrence"], d["outcome"]) for d in r.json()]
    assert sorted((d["customer_id"], d["occurrence"], d["outcome"]) for d in listed) == sorted(each)
    r = await st.offers.get(f"/v1/campaigns/{campaign_id}/decisions", params={"outcome": "requested"})
    requested = sorted(d["customer_id"] for d in r.json()["items"])
    assert requested == sorted(cid for cid, _, outcome in each if outcome == "requested")
    assert (await st.offers.get("/v1/campaigns/cmp_none/decisions")).status_code == 404
    for bad in ({"outcome": "nope"}, {"after": -1}, {"limit": 0}, {"limit": 5001}):
        r = await st.offers.get(f"/v1/campaigns/{campaign_id}/decisions", params=bad)
        assert r.status_code == 422 and next(iter(bad)) in r.text, (bad, r.text)


async def test_scenario3_recovery_message_or_discount_exactly_one_each(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_recovery", "sms")
        await st.templates("t_winback", "sms")
        lapsed = {"kind": "segment_entered", "segment_key": "lapsed_regulars"}
        recovery = await st.create(
            f.campaign(
                "Service recovery",
                lapsed,
                "t_recovery",
                control_share=0,
                delivery={"template": "t_recovery", "channel": "sms"},
                audience={
                    "conditions": [
                        {"field": "last_feedback_topic", "op": "=", "value": "quality"},
                        {"field": "last_feedback_rating", "op": "<=", "value": 2},
                    ]
                },
                limits={"priority": 10},
            )
        )
        winback = await st.create(
            f.campaign(
                "15% win-back",
                lapsed,
                "t_winback",
                control_share=0,
                delivery={"template": "t_winback", "channel": "sms"},
                offer={"kind": "percent", "value": "15", "min_quantity": 2},
                limits={"priority": 5},
            )
        )
        now = clock.now()
        base = {"orders": 4, "value_tier": "middle"}
        await st.publish(
            TOPIC_SEGMENTS,
            [
                f.segment_entered(
                    "unhappy",
                    "lapsed_regulars",
                    now,
                    {**base, "last_feedback_topic": "quality", "last_feedback_rating": 1},
                ),
                f.segment_entered("quiet", "lapsed_regulars", now, base),
                f.segment_entered(
                    "price", "lapsed_regulars", now, {**base, "last_feedback_topic": "price", "last_feedback_rating": 2}
                ),
            ],
        )
        await st.wait_decisions(6)
        assert await st.decisions(recovery["id"]) == {
            "unhappy": "requested",
            "quiet": "not_in_audience",
            "price": "not_in_audience",
        }
        assert await st.decisions(winback["id"]) == {
            "unhappy": "lower_priority",
            "quiet": "requested",
            "price": "requested",
        }
        msgs = await st.requested()
        assert sorted((m["customer_id"], m["template"], m["channel"]) for m in msgs) == [
            ("price", "t_winback", "sms"),
            ("quiet", "t_winback", "sms"),
            ("unhappy", "t_recovery", "sms"),
        ]
        assert next(m for m in msgs if m["customer_id"] == "quiet")["variables"]["discount"] == "15%"
        assert "higher priority" in (await why(st, winback["id"], "unhappy"))["sentence"]
        assert "audience" in (await why(st, recovery["id"], "quiet"))["sentence"]


async def test_scenario5_economics_guard_skips_unprofitable_and_dry_run_counts_them(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_s5", "email")
        now = clock.now()
        tiers = {"c1": "core", "c2": "core", "m1": "middle", "u1": "unprofitable", "u2": "unprofitable"}
        await st.publish(
            TOPIC_SEGMENTS,
            [f.segment_entered(k, "core", now, {"value_tier": t, "avg_check": "40"}) for k, t in tiers.items()],
        )
        from crm_common.testing.helpers import eventually

        await eventually(lambda: st.sql("SELECT 1 FROM customers HAVING count(*) = 5"), what="digests")
        body = f.campaign(
            "10% off",
            {"kind": "event", "event_type": "custom", "name": "app_opened"},
            "t_s5",
            offer={"kind": "percent", "value": "10"},
            control_share=0,
        )
        dry = (await st.offers.post("/v1/campaigns/dry-run", json={"definition": body})).json()
        assert dry["outcomes"]["economics_guard"] == 2 and dry["reached"] == 3
        # 10% of an average check of 40, times the expected redemption rate (0.15); e-mail costs nothing.
        assert dry["discount_cost"] == "12.00" and dry["expected_cost"] == "1.80"
        core_only = {**body, "audience": {"tiers": ["core"]}}
        dry = (await st.offers.post("/v1/campaigns/dry-run", json={"definition": core_only})).json()
        assert (dry["reached"], dry["outcomes"]["not_in_audience"], dry["outcomes"]["economics_guard"]) == (2, 3, 0)
        c = await st.create(body)
        await st.publish(TOPIC_EVENTS, [f.event("custom", k, now, {"name": "app_opened"}) for k in tiers])
        await st.wait_decisions(5, c["id"])
        assert await st.decisions(c["id"]) == {
            "c1": "requested",
            "c2": "requested",
            "m1": "requested",
            "u1": "economics_guard",
            "u2": "economics_guard",
        }
        assert "economics guard" in (await why(st, c["id"], "u1"))["sentence"]
        # An informational campaign is no discount: the guard does not apply.
        info = await st.create({**body, "name": "news", "offer": {"kind": "info"}})
        await st.publish(TOPIC_EVENTS, [f.event("custom", "u2", now + timedelta(minutes=1), {"name": "app_opened"})])
        await st.wait_decisions(1, info["id"])
        assert (await st.decisions(info["id"]))["u2"] == "requested"


async def test_scenario6_browse_abandonment_waits_and_a_purchase_cancels(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_s6", "push")
        c = await st.create(
            f.campaign(
                "Still thinking about shoes?",
                {
                    "kind": "no_purchase_after",
                    "event_type": "product_viewed",
                    "properties": {"category": "shoes"},
                    "wait_hours": 24,
                },
                "t_s6",
                control_share=0,
                limits={"once_per_customer": True},
            )
        )
        t0 = clock.now()

        def view(k: str, sku: str, at: datetime, category: str = "shoes") -> dict:
            return f.event("product_viewed", k, at, {"sku": sku, "category": category, "name": f"Shoe {sku}"})

        await st.publish(
            TOPIC_EVENTS,
            [
                view("walker", "s-1", t0),
                view("buyer", "s-2", t0),
                view("twice", "s-3", t0),
                view("twice", "s-4", t0 + timedelta(minutes=5)),
                view("hatter", "h-1", t0, "hats"),
            ],
        )
        await st.wait_decisions(3, c["id"])
        assert set((await st.decisions(c["id"])).values()) == {"waiting"}
        assert "waiting" in (await why(st, c["id"], "walker"))["sentence"]
        await st.publish(TOPIC_EVENTS, [f.purchase("buyer", t0 + timedelta(hours=2))])
        from crm_common.testing.helpers import eventually

        async def cancelled() -> bool:
            return (await st.decisions(c["id"])).get("buyer") == "already_bought"

        await eventually(cancelled, what="the purchase cancelling the timer")
        clock.advance(hours=23)
        assert (await st.sweep("timers"))["fired"] == 0
        clock.advance(hours=2)
        assert (await st.sweep("timers")) == {"fired": 2, "requested": 2}
        assert (await st.sweep("timers"))["fired"] == 0
        assert await st.decisions(c["id"]) == {"walker": "requested", "buyer": "already_bought", "twice": "requested"}
        msgs = {m["customer_id"]: m for m in await st.requested(c["id"])}
        assert sorted(msgs) == ["twice", "walker"]
        assert msgs["twice"]["variables"]["products"] == "Shoe s-3, Shoe s-4"
        assert msgs["walker"]["variables"]["product_name"] == "Shoe s-1"
        assert "bought" in (await why(st, c["id"], "buyer"))["sentence"]
        # Once per customer: a new view later starts a timer whose firing records once_per_customer.
        await st.publish(TOPIC_EVENTS, [view("walker", "s-9", clock.now())])

        async def second_timer() -> bool:
            return bool(await st.sql("SELECT 1 FROM timers WHERE customer_id = 'walker' AND state = 'waiting'"))

        await eventually(second_timer, what="a second timer")
        clock.advance(hours=25)
        assert (await st.sweep("timers")) == {"fired": 1, "requested": 0}
        outcomes = await st.sql("SELECT outcome FROM decisions WHERE customer_id = 'walker' ORDER BY id")
        assert [o["outcome"] for o in outcomes] == ["requested", "once_per_customer"]


async def test_scenario7_scheduled_broadcast_at_each_customers_local_time(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_s7", "email", "push", "sms")
        r = await st.seg.post(
            "/v1/segments",
            json={"key": "sale_list", "name": "Sale list", "rule": {"attr": "orders", "op": ">=", "value": 1}},
        )
        assert r.status_code == 201, r.text
        c = await st.create(
            f.campaign(
                "New Year sale",
                {"kind": "schedule", "date": "2026-01-06", "local_time": "10:00"},
                "t_s7",
                audience={"include_segments": ["sale_list"]},
                control_share=0,
            )
        )
        now = clock.now()
        zones = {"tokyo": "Asia/Tokyo", "berlin": "Europe/Berlin", "newyork": "America/New_York", "nozone": None}
        events = [
            f.event("customer_updated", k, now, {"timezone": tz} if tz else {"first_name": "N"})
            for k, tz in zones.items()
        ]
        await st.publish(TOPIC_EVENTS, [*events, f.event("customer_updated", "outsider", now, {"timezone": "UTC"})])
        await st.publish(TOPIC_SEGMENTS, [f.segment_entered(k, "sale_list", now) for k in zones])
        from crm_common.testing.helpers import eventually

        await eventually(lambda: st.sql("SELECT 1 FROM memberships HAVING count(*) = 4"), what="memberships")
        await eventually(
            lambda: st.sql("SELECT 1 FROM customers WHERE timezone IS NOT NULL HAVING count(*) = 4"), what="time zones"
        )

        async def at(hour: int, minute: int) -> dict[str, str]:
            clock.set(datetime(2026, 1, 6, hour, minute, tzinfo=UTC))
            await st.sweep("triggers")
            return {k: v for k, v in (await st.decisions(c["id"])).items() if v == "requested"}

        assert await at(0, 30) == {}
        assert await at(1, 5) == {"tokyo": "requested"}  # 10:05 in Tokyo
        assert set(await at(9, 5)) == {"tokyo", "berlin"}
        assert set(await at(10, 5)) == {"tokyo", "berlin", "nozone"}  # no time zone: UTC
        assert set(await at(15, 5)) == {"tokyo", "berlin", "nozone", "newyork"}
        assert set(await at(15, 30)) == {"tokyo", "berlin", "nozone", "newyork"}
        ats = {
            r["customer_id"]: r["at"]
            for r in await st.sql("SELECT customer_id, at FROM decisions WHERE outcome = 'requested'")
        }
        assert ats["berlin"] == datetime(2026, 1, 6, 9, 0, tzinfo=UTC)
        assert ats["newyork"] == datetime(2026, 1, 6, 15, 0, tzinfo=UTC)
        assert (await st.decisions(c["id"]))["outsider"] == "not_in_audience"
        assert len(await st.requested(c["id"])) == 4


async def test_inactivity_and_birthday_sweeps_fire_once(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_time", "email")
        lapsed = await st.create(
            f.campaign("We miss you", {"kind": "inactivity", "days": 60}, "t_time", control_share=0)
        )
        bday = await st.create(
            f.campaign(
                "Happy birthday",
                {"kind": "birthday", "local_time": "10:00"},
                "t_time",
                control_share=0,
                offer={"kind": "points_multiplier", "multiplier": "2"},
            )
        )
        now = clock.now()  # 2026-01-05 12:00 UTC
        await st.publish(
            TOPIC_EVENTS,
            [
                f.purchase("old", now - timedelta(days=61)),
                f.purchase("recent", now - timedelta(days=10)),
                f.event(
                    "customer_updated", "born_today", now, {"birth_date": "1990-01-05", "timezone": "Europe/Berlin"}
                ),
                f.event("customer_updated", "born_tomorrow", now, {"birth_date": "1990-01-06"}),
            ],
        )
        from crm_common.testing.helpers import eventually

        await eventually(lambda: st.sql("SELECT 1 FROM customers HAVING count(*) = 4"), what="customer facts")
        assert (await st.sweep("triggers"))["requested"] == 2
        assert await st.decisions(lapsed["id"]) == {"old": "requested"}
        assert await st.decisions(bday["id"]) == {"born_today": "requested"}
        assert (await st.sweep("triggers"))["requested"] == 0
        clock.advance(days=1)
        assert (await st.sweep("triggers"))["requested"] == 1
        assert (await st.decisions(bday["id"]))["born_tomorrow"] == "requested"
        msgs = {m["customer_id"]: m for m in await st.requested(bday["id"])}
        assert msgs["born_today"]["variables"]["discount"] == "x2 bonus points"
