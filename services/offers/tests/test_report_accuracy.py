"""Does the report measure what a campaign did? Populations with a planted uplift (a known share of
treated customers buys more) over 20 seeds: the 95% interval of the incremental revenue must contain
the planted amount in at least 17; with nothing planted it must contain zero in at least 17.

For speed the 20-seed populations are written straight into offers' tables (decisions as
DECIDE_SQL writes them, with the arm from the `offers_bucket` hash salted by the seed, so every run
draws the same populations, and purchases as
`attribution.record_purchases` writes them). `test_report_through_the_pipeline` goes the real way:
events on the broker, the consumer, the decision statement, the delivery verdicts, the report.
"""

from __future__ import annotations

import hashlib
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson

from crm_common.testing.helpers import eventually
from offers.settings import TOPIC_DELIVERIES, TOPIC_EVENTS

from . import factories as f

GSALT = "global-control"
GSHARE = 0.05
CONTROL = 0.2


def bucket(salt: str, customer: str) -> float:
    """offers_bucket, recomputed here: md5(salt:customer), its first 32 bits over 2^32."""
    return int(hashlib.md5(f"{salt}:{customer}".encode()).hexdigest()[:8], 16) / 4294967296.0


async def insert_population(st: Any, campaign_id: str, rows: list[dict[str, Any]], purchases: list[dict[str, Any]]):
    async with st.sm() as s, s.begin():
        from sqlalchemy import text

        await s.execute(
            text(
                "INSERT INTO decisions (campaign_id, version, customer_id, occurrence, outcome, priority, at, "
                "decided_at, message_id) SELECT :c, 1, j.k, j.o, j.outcome, 0, j.at, j.at, j.m "
                "FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, o text, outcome text, at timestamptz, m text)"
            ),
            {"c": campaign_id, "rows": orjson.dumps(rows, default=str).decode()},
        )
        await s.execute(
            text(
                "INSERT INTO purchases (event_id, customer_id, order_id, occurred_at, revenue, properties, "
                "recorded_at) SELECT j.e, j.k, j.e, j.at, j.rev, '{}'::jsonb, j.at "
                "FROM json_to_recordset(CAST(:rows AS json)) AS j(e text, k text, at timestamptz, rev numeric)"
            ),
            {"rows": orjson.dumps(purchases, default=str).decode()},
        )


def population(seed: int, campaign_id: str, start: Any, *, n: int, share: float, extra: float):
    """Customers assigned as live evaluation would; each has a spending level, buys before and after
    the assignment with the same propensity; `share` of the treated buy once more, for `extra`."""
    rng = random.Random(seed)
    rows, purchases = [], []
    planted = 0.0
    for i in range(n):
        k = f"s{seed}-{i}"
        at = start + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
        if bucket(GSALT, k) < GSHARE:
            outcome = "global_control"
        # The campaign's own hash salted by the seed, not by the (random) campaign id: the same
        # populations, arms and verdicts on every run.
        elif bucket(f"seed-{seed}", k) < CONTROL:
            outcome = "control"
        else:
            outcome = "requested"
        rows.append({"k": k, "o": f"o-{k}", "outcome": outcome, "at": at, "m": f"ofr-{k}"})
        level = rng.lognormvariate(3.0, 0.7)
        # Habits: regulars buy in most windows, the rest seldom (what CUPED exploits).
        propensity = 0.85 if rng.random() < 0.4 else 0.1
        if rng.random() < propensity:
            purchases.append({"e": f"pre-{k}", "k": k, "at": at - timedelta(days=3), "rev": round(level, 2)})
        if rng.random() < propensity:
            amount = round(level * rng.uniform(0.8, 1.2), 2)
            purchases.append({"e": f"post-{k}", "k": k, "at": at + timedelta(days=2), "rev": amount})
        if outcome == "requested" and rng.random() < share:
            purchases.append({"e": f"up-{k}", "k": k, "at": at + timedelta(days=4), "rev": extra})
            planted += extra
        # Outside the 7-day window: never counted.
        if rng.random() < 0.2:
            purchases.append({"e": f"late-{k}", "k": k, "at": at + timedelta(days=9), "rev": 500})
    return rows, purchases, planted


async def _campaign(st: Any, name: str) -> str:
    c = await st.create(
        f.campaign(name, {"kind": "event", "event_type": "custom", "name": "x"}, "t_acc", control_share=CONTROL),
        activate=False,
    )
    return str(c["id"])


async def test_planted_uplift_is_covered_and_no_uplift_covers_zero(make_stack, clock):
    async with make_stack() as st:
        await st.templates("t_acc", "email")
        start = clock.now() - timedelta(days=30)
        covered = covered_cuped = covered_zero = 0
        widths, widths_cuped = [], []
        for seed in range(20):
            cid = await _campaign(st, f"planted {seed}")
            rows, purchases, planted = population(seed, cid, start, n=2500, share=0.15, extra=30.0)
            assert planted > 0
            await insert_population(st, cid, rows, purchases)
            r = await st.offers.get(f"/v1/campaigns/{cid}/report")
            assert r.status_code == 200, r.text
            rep = r.json()
            assert rep["arms"]["treated"]["members"] == sum(x["outcome"] == "requested" for x in rows)
            assert rep["sample_ratio"]["mismatch"] is False
            inc = rep["incremental_revenue"]
            covered += inc["low"] <= planted <= inc["high"]
            widths.append(inc["high"] - inc["low"])
            rc = (await st.offers.get(f"/v1/campaigns/{cid}/report", params={"cuped": "true"})).json()
            inc_c = rc["incremental_revenue"]
            covered_cuped += inc_c["low"] <= planted <= inc_c["high"]
            widths_cuped.append(inc_c["high"] - inc_c["low"])

            cid0 = await _campaign(st, f"null {seed}")
            rows0, purchases0, planted0 = population(1000 + seed, cid0, start, n=2500, share=0.0, extra=30.0)
            assert planted0 == 0
            await insert_population(st, cid0, rows0, purchases0)
            inc0 = (await st.offers.get(f"/v1/campaigns/{cid0}/report")).json()["incremental_revenue"]
            covered_zero += inc0["low"] <= 0 <= inc0["high"]
        print(
            f"covered {covered}/20, with CUPED {covered_cuped}/20, zero covered {covered_zero}/20, "
            f"CUPED width {sum(widths_cuped) / sum(widths):.3f} of plain"
        )
        assert covered >= 17, covered
        assert covered_cuped >= 17, covered_cuped
        assert covered_zero >= 17, covered_zero
        # The pre-period revenue predicts the window's: CUPED narrows every interval.
        assert sum(widths_cuped) < 0.9 * sum(widths), (sum(widths_cuped), sum(widths))


async def test_report_through_the_pipeline(make_stack, clock):
    """Events on crm.events.v1 -> consumer -> decisions; purchases and a refund attributed; the
    notifier's verdicts on crm.deliveries.v1; the report's figures follow exactly."""
    async with make_stack(global_control_share=0.0) as st:
        await st.templates("t_pipe", "email")
        c = await st.create(
            f.campaign(
                "App openers",
                {"kind": "event", "event_type": "custom", "name": "app_opened"},
                "t_pipe",
                control_share=0.5,
                attribution_days=3,
            )
        )
        now = clock.now()
        customers = [f"p{i}" for i in range(40)]
        # A purchase before the trigger: the pre-period, not the window.
        await st.publish(TOPIC_EVENTS, [f.purchase("p0", now - timedelta(days=1), "99")])
        await st.publish(TOPIC_EVENTS, [f.event("custom", k, now, {"name": "app_opened"}) for k in customers])
        decided = await st.wait_decisions(40, c["id"])
        treated = sorted(k for k, o in decided.items() if o == "requested")
        control = sorted(k for k, o in decided.items() if o == "control")
        assert len(treated) + len(control) == 40 and treated and control
        # Every treated customer buys 10 in the window, the first control customer 10, every treated
        # one 500 after the window (not counted), and the first treated order is refunded by 4.
        later = now + timedelta(hours=5)
        buys = [f.purchase(k, later, "10") for k in treated] + [f.purchase(control[0], later, "10")]
        buys += [f.purchase(k, now + timedelta(days=4), "500") for k in treated]
        refund = f.event(
            "refund",
            treated[0],
            later + timedelta(hours=1),
            {"order_id": buys[0]["properties"]["order_id"], "amount": "4"},
        )
        await st.publish(TOPIC_EVENTS, [*buys, refund])
        # Redelivered: counted once.
        await st.publish(TOPIC_EVENTS, [buys[0], refund])
        messages = await st.sql("SELECT message_id FROM decisions WHERE outcome = 'requested' ORDER BY customer_id")
        verdicts = [("delivered", None, "0.01"), ("opened", None, "0.01"), ("suppressed", "quiet_hours", None)]
        deliveries = [
            {
                "id": f"dlv-{i}",
                "type": "delivery.updated",
                "customer_id": treated[i],
                "occurred_at": later.isoformat(),
                "message_id": messages[i]["message_id"],
                "status": status,
                "channel": "email",
                "reason": reason,
                "cost": cost,
            }
            for i, (status, reason, cost) in enumerate(verdicts)
        ]
        await st.publish(TOPIC_DELIVERIES, deliveries)

        async def applied() -> bool:
            p = await st.sql("SELECT count(*) AS n FROM purchases")
            r = await st.sql("SELECT count(*) AS n FROM refunds")
            d = await st.sql("SELECT count(*) AS n FROM decisions WHERE delivery_status IS NOT NULL")
            return p[0]["n"] == 2 * len(treated) + 2 and r[0]["n"] == 1 and d[0]["n"] == 3

        await eventually(applied, what="purchases, the refund and the verdicts")
        r = await st.offers.get(f"/v1/campaigns/{c['id']}/report", params={"cap_percentile": 100})
        assert r.status_code == 200, r.text
        rep = r.json()
        t, k = rep["arms"]["treated"], rep["arms"]["control"]
        assert (t["members"], k["members"]) == (len(treated), len(control))
        assert t["converted"] == len(treated) and k["converted"] == 1
        assert t["revenue"] == 10 * len(treated) - 4
        assert k["revenue"] == 10
        assert t["revenue_per_member"] == round((10 * len(treated) - 4) / len(treated), 4)
        rpm_t, rpm_c = (10 * len(treated) - 4) / len(treated), 10 / len(control)
        assert abs(rep["incremental_revenue"]["estimate"] - (rpm_t - rpm_c) * len(treated)) < 1e-3
        pre = 99 if "p0" in treated else 0
        assert t["pre_revenue_per_member"] == round(pre / len(treated), 4)
        assert rep["delivery"]["sent"] == 2 and rep["delivery"]["delivered"] == 2
        assert rep["delivery"]["opened"] == 1 and rep["delivery"]["suppressed"] == {"quiet_hours": 1}
        assert rep["cost"]["channel"] == 0.02 and rep["cost"]["total"] == 0.02
        day = rep["series"][0]
        assert (day["treated"], day["control"], day["audience"]) == (len(treated), len(control), 40)
        assert any("fewer than 150" in w for w in rep["warnings"])
        expected_roi = ((rpm_t - rpm_c) * len(treated) * 0.3 - 0.02) / 0.02
        assert abs(rep["roi"]["estimate"] - expected_roi) < 0.05


async def test_the_economics_guard_never_approves_a_negative_expected_margin(make_stack, clock):
    """Customers with a planted margin per order: whoever's margin minus the offer's discount is
    negative is held back by the guard, never treated nor held out as control; the others pass."""
    async with make_stack(global_control_share=0.0) as st:
        await st.templates("t_guard", "email")
        rng = random.Random(7)
        now = clock.now()
        planted: dict[str, Decimal] = {}
        rows = []
        for i in range(300):
            k = f"g{i}"
            orders = rng.randint(1, 10)
            per_order = Decimal(str(round(rng.uniform(-20, 40), 2)))
            avg_check = Decimal(str(round(rng.uniform(20, 200), 2)))
            # 10% off the average check: the discount the guard reckons with.
            planted[k] = per_order - (avg_check * Decimal("0.10")).quantize(Decimal("0.0001"))
            rows.append(
                {
                    "k": k,
                    "digest": {"orders": orders, "avg_check": float(avg_check), "value_tier": "middle"},
                    "margin": per_order * orders,
                    "last": now - timedelta(days=40),
                }
            )
        from sqlalchemy import text

        async with st.sm() as s, s.begin():
            await s.execute(
                text(
                    "INSERT INTO customers (customer_id, digest, digest_at, value_tier, margin, last_purchase_at, "
                    "purchases, updated_at) SELECT j.k, j.digest, :now, 'middle', j.margin, j.last, 1, :now "
                    "FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, digest jsonb, margin numeric, "
                    "last timestamptz)"
                ),
                {"rows": orjson.dumps(rows, default=str).decode(), "now": now},
            )
        c = await st.create(
            f.campaign(
                "Win back, if it pays",
                {"kind": "inactivity", "days": 30},
                "t_guard",
                offer={"kind": "percent", "value": "10"},
                economics={"min_expected_margin": "0"},
                control_share=0.3,
            )
        )
        await st.sweep("triggers")
        decided = await st.decisions(c["id"])
        assert len(decided) == 300
        negative = {k for k, m in planted.items() if m < 0}
        assert 50 < len(negative) < 250
        for k, outcome in decided.items():
            if k in negative:
                assert outcome == "economics_guard", (k, planted[k], outcome)
            else:
                assert outcome in ("requested", "control"), (k, planted[k], outcome)
