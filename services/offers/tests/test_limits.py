"""Limits and control groups: cooldown, once per customer, priority in the collision window, budget,
campaign and global control held out at the trigger moment, redelivery and re-evaluation send once."""

from __future__ import annotations

from datetime import timedelta

from crm_common.testing.helpers import eventually
from offers.settings import TOPIC_EVENTS, TOPIC_SEGMENTS

from . import factories as f

NO_GLOBAL = {"global_control_share": 0.0}


def opened(name: str) -> dict:
    return {"kind": "event", "event_type": "custom", "name": name}


async def test_cooldown_and_once_per_customer(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_lim", "email")
        cool = await st.create(
            f.campaign(
                "cool", opened("cool"), "t_lim", control_share=0, limits={"cooldown_days": 7, "collision_minutes": 0}
            )
        )
        once = await st.create(
            f.campaign(
                "once",
                opened("once"),
                "t_lim",
                control_share=0,
                limits={"once_per_customer": True, "collision_minutes": 0},
            )
        )
        t0 = clock.now()
        # Two in one batch, one a day later, one after the cooldown.
        await st.publish(
            TOPIC_EVENTS,
            [
                f.event("custom", "k", t0, {"name": "cool"}),
                f.event("custom", "k", t0 + timedelta(minutes=1), {"name": "cool"}),
                f.event("custom", "k", t0, {"name": "once"}),
                f.event("custom", "k", t0 + timedelta(minutes=1), {"name": "once"}),
            ],
        )
        await st.wait_decisions(4)
        await st.publish(
            TOPIC_EVENTS,
            [
                f.event("custom", "k", t0 + timedelta(days=1), {"name": "cool"}),
                f.event("custom", "k", t0 + timedelta(days=8), {"name": "once"}),
            ],
        )
        await st.wait_decisions(6)
        await st.publish(TOPIC_EVENTS, [f.event("custom", "k", t0 + timedelta(days=8), {"name": "cool"})])
        await st.wait_decisions(7)
        seq = {
            c: [
                r["outcome"]
                for r in await st.sql("SELECT outcome FROM decisions WHERE campaign_id = :c ORDER BY at, id", c=c)
            ]
            for c in (cool["id"], once["id"])
        }
        assert seq[cool["id"]] == ["requested", "cooldown", "cooldown", "requested"]
        assert seq[once["id"]] == ["requested", "once_per_customer", "once_per_customer"]
        assert len(await st.requested()) == 3
        sentence = (await st.offers.get(f"/v1/campaigns/{once['id']}/why/k")).json()["decisions"][0]["explanation"]
        assert "once" in sentence


async def test_priority_within_the_collision_window(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_prio", "email")
        low = await st.create(f.campaign("low", opened("p"), "t_prio", control_share=0, limits={"priority": 1}))
        high = await st.create(f.campaign("high", opened("p"), "t_prio", control_share=0, limits={"priority": 9}))
        solo = await st.create(
            f.campaign("solo", opened("q"), "t_prio", control_share=0, limits={"priority": 1, "collision_minutes": 30})
        )
        t0 = clock.now()
        await st.publish(TOPIC_EVENTS, [f.event("custom", "k", t0, {"name": "p"})])
        await st.wait_decisions(2)
        assert (await st.decisions(high["id"]), await st.decisions(low["id"])) == (
            {"k": "requested"},
            {"k": "lower_priority"},
        )
        # Within the window a lower campaign yields to what the higher one sent; after it, it sends.
        await st.publish(TOPIC_EVENTS, [f.event("custom", "k", t0 + timedelta(minutes=10), {"name": "q"})])
        await st.wait_decisions(3)
        await st.publish(TOPIC_EVENTS, [f.event("custom", "k", t0 + timedelta(minutes=40), {"name": "q"})])
        await st.wait_decisions(4)
        rows = await st.sql("SELECT outcome FROM decisions WHERE campaign_id = :c ORDER BY at", c=solo["id"])
        assert [r["outcome"] for r in rows] == ["lower_priority", "requested"]


async def test_budget_caps_messages(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_budget", "email")
        c = await st.create(
            f.campaign("capped", opened("b"), "t_budget", control_share=0, limits={"budget_messages": 3})
        )
        t0 = clock.now()
        await st.publish(TOPIC_EVENTS, [f.event("custom", f"k{i}", t0, {"name": "b"}) for i in range(5)])
        await st.wait_decisions(5)
        await st.publish(TOPIC_EVENTS, [f.event("custom", "late", t0, {"name": "b"})])
        await st.wait_decisions(6)
        outcomes = list((await st.decisions(c["id"])).values())
        assert outcomes.count("requested") == 3 and outcomes.count("budget_exhausted") == 3
        assert (await st.offers.get(f"/v1/campaigns/{c['id']}")).json()["messages_sent"] == 3
        assert "budget" in (await st.offers.get(f"/v1/campaigns/{c['id']}/why/late")).json()["sentence"]


async def test_control_and_global_control_are_held_out_and_recorded(make_stack, clock):
    async with make_stack(global_control_share=0.05) as st:
        await st.templates("t_ctl", "email")
        c = await st.create(
            f.campaign("ctl", {"kind": "segment_entered", "segment_key": "core"}, "t_ctl", control_share=0.3)
        )
        now = clock.now()
        n = 200
        entries = [f.segment_entered(f"k{i}", "core", now) for i in range(n)]
        await st.publish(TOPIC_SEGMENTS, entries)
        # A redelivery of the same messages and a re-evaluation change nothing.
        await st.publish(TOPIC_SEGMENTS, entries[:50])
        decided = await st.wait_decisions(n, c["id"])
        expected = {
            r["k"]: r["o"]
            for r in await st.sql(
                "SELECT k, CASE WHEN offers_bucket('global-control', k) < 0.05 THEN 'global_control' "
                "WHEN offers_bucket(:c, k) < 0.3 THEN 'control' ELSE 'requested' END AS o "
                "FROM unnest(CAST(:ks AS text[])) AS k",
                c=c["id"],
                ks=[f"k{i}" for i in range(n)],
            )
        }
        assert decided == expected
        counts = {o: list(decided.values()).count(o) for o in set(decided.values())}
        assert 2 <= counts["global_control"] <= 25 and 35 <= counts["control"] <= 85
        await eventually(
            lambda: st.sql("SELECT 1 FROM outbox WHERE sent_at IS NULL HAVING count(*) = 0"), what="relay drained"
        )
        msgs = await st.requested(c["id"])
        assert sorted(m["customer_id"] for m in msgs) == sorted(k for k, o in decided.items() if o == "requested")
        assert len({m["id"] for m in msgs}) == len(msgs)
        held = next(k for k, o in decided.items() if o == "control")
        why = (await st.offers.get(f"/v1/campaigns/{c['id']}/why/{held}")).json()
        assert not why["received"] and "control group" in why["sentence"]
        g = next(k for k, o in decided.items() if o == "global_control")
        assert "global control" in (await st.offers.get(f"/v1/campaigns/{c['id']}/why/{g}")).json()["sentence"]
        mine = (await st.offers.get(f"/v1/customers/{held}/decisions")).json()
        assert [d["outcome"] for d in mine] == ["control"]
        # Re-running the same trigger occurrences through the decision statement sends nothing new.
        await st.publish(TOPIC_SEGMENTS, [{**e, "id": e["id"]} for e in entries[50:60]])
        await st.publish(TOPIC_SEGMENTS, [f.segment_entered("k_new", "core", now)])
        await st.wait_decisions(n + 1, c["id"])
        assert (await st.sql("SELECT count(*) AS n FROM decisions"))[0]["n"] == n + 1
