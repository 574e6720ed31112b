"""The report's figures against an independent computation (Python's `statistics`, in this file), its
bad input, the cost tables of the parallel changes, the t quantile against table values, and the
back-test."""

from __future__ import annotations

import math
import statistics
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from offers.stats import t_cdf, t_quantile

from . import factories as f

# Student's t 0.975 and 0.995 quantiles from printed tables.
T_TABLE = {1: (12.706, 63.657), 2: (4.303, 9.925), 5: (2.571, 4.032), 10: (2.228, 3.169), 30: (2.042, 2.750)}
T_TABLE.update({60: (2.000, 2.660), 120: (1.980, 2.617)})


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_tables(df):
    q975, q995 = T_TABLE[df]
    assert abs(t_quantile(0.975, df) - q975) < 5e-4
    assert abs(t_quantile(0.995, df) - q995) < 5e-4
    assert abs(t_quantile(0.025, df) + q975) < 5e-4
    assert abs(t_cdf(t_quantile(0.9, df + 0.37), df + 0.37) - 0.9) < 1e-9


def _t_quantile_by_integration(p: float, df: float) -> float:
    """Independent of offers.stats: Simpson's rule over the t density, bisection on its integral."""

    def density(x: float) -> float:
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        s = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


# A small fixed data set: members by arm with (revenue in the window, revenue before it).
TREATED = {"t1": (120, 100), "t2": (0, 0), "t3": (45.5, 30), "t4": (80, 90), "t5": (0, 20), "t6": (210, 150)}
TREATED.update({"t7": (15, 0), "t8": (60, 70)})
CONTROL = {"c1": (20, 40), "c2": (0, 0), "c3": (70, 80), "c4": (0, 10), "c5": (35, 20), "c6": (5000, 60)}


async def _seed(st: Any, cid: str, at: Any) -> None:
    decisions, purchases = [], []
    for arm, members in (("requested", TREATED), ("control", CONTROL)):
        for k, (post, pre) in members.items():
            decisions.append({"k": k, "outcome": arm, "at": at})
            if post:
                purchases.append({"e": f"post-{k}", "k": k, "at": at + timedelta(days=1), "rev": post})
            if pre:
                purchases.append({"e": f"pre-{k}", "k": k, "at": at - timedelta(days=1), "rev": pre})
    # A later decision about t1 (another occurrence) opens no second window: t1 counts once.
    decisions.append({"k": "t1", "outcome": "requested", "at": at + timedelta(days=2), "o": "again"})
    # Not members: not in the audience, or skipped by the guard.
    decisions += [
        {"k": "x1", "outcome": "not_in_audience", "at": at},
        {"k": "x2", "outcome": "economics_guard", "at": at},
    ]
    async with st.sm() as s, s.begin():
        await s.execute(
            text(
                "INSERT INTO decisions (campaign_id, version, customer_id, occurrence, outcome, priority, at, decided_at) "
                "SELECT :c, 1, j.k, coalesce(j.o, 'first'), j.outcome, 0, j.at, j.at "
                "FROM json_to_recordset(CAST(:rows AS json)) AS j(k text, o text, outcome text, at timestamptz)"
            ),
            {"c": cid, "rows": orjson.dumps(decisions, default=str).decode()},
        )
        await s.execute(
            text(
                "INSERT INTO purchases (event_id, customer_id, order_id, occurred_at, revenue, properties, "
                "recorded_at) SELECT j.e, j.k, j.e, j.at, j.rev, '{}'::jsonb, j.at "
                "FROM json_to_recordset(CAST(:rows AS json)) AS j(e text, k text, at timestamptz, rev numeric)"
            ),
            {"rows": orjson.dumps(purchases, default=str).decode()},
        )


def _welch(t: list[float], c: list[float]) -> dict[str, float]:
    vt, vc = statistics.variance(t) / len(t), statistics.variance(c) / len(c)
    diff = statistics.fmean(t) - statistics.fmean(c)
    df = (vt + vc) ** 2 / (vt**2 / (len(t) - 1) + vc**2 / (len(c) - 1))
    half = _t_quantile_by_integration(0.975, df) * math.sqrt(vt + vc)
    return {"diff": diff, "df": df, "low": diff - half, "high": diff + half}


async def test_report_equals_an_independent_computation(make_stack, clock):
    async with make_stack(global_control_share=0.0) as st:
        await st.templates("t_fix", "email")
        c = await st.create(
            f.campaign("Fixed", {"kind": "event", "event_type": "custom", "name": "x"}, "t_fix", control_share=0.4),
            activate=False,
        )
        await _seed(st, c["id"], clock.now() - timedelta(days=20))
        r = await st.offers.get(f"/v1/campaigns/{c['id']}/report", params={"cap_percentile": 90, "margin_rate": 0.5})
        assert r.status_code == 200, r.text
        rep = r.json()
        t = [post for post, _ in TREATED.values()]
        k = [post for post, _ in CONTROL.values()]
        # Capped per arm at the 90th percentile (linear interpolation: statistics' "inclusive" method).
        cap_t = statistics.quantiles(t, n=10, method="inclusive")[8]
        cap_k = statistics.quantiles(k, n=10, method="inclusive")[8]
        tc, kc = [min(x, cap_t) for x in t], [min(x, cap_k) for x in k]
        assert rep["arms"]["treated"]["members"] == 8 and rep["arms"]["control"]["members"] == 6
        assert rep["arms"]["treated"]["converted"] == 6 and rep["arms"]["control"]["converted"] == 4
        assert rep["arms"]["treated"]["revenue"] == pytest.approx(sum(t))
        assert rep["arms"]["control"]["cap"] == pytest.approx(cap_k, abs=1e-4)
        assert rep["arms"]["control"]["revenue_per_member_capped"] == pytest.approx(statistics.fmean(kc), abs=1e-4)
        w = _welch(tc, kc)
        per = rep["incremental_revenue_per_member"]
        assert per["estimate"] == pytest.approx(w["diff"], abs=1e-4)
        assert per["df"] == pytest.approx(w["df"], abs=1e-3)
        assert per["low"] == pytest.approx(w["low"], abs=1e-3)
        assert per["high"] == pytest.approx(w["high"], abs=1e-3)
        inc = rep["incremental_revenue"]
        assert inc["estimate"] == pytest.approx(w["diff"] * 8, abs=1e-3)
        assert inc["low"] == pytest.approx(w["low"] * 8, abs=1e-2)
        # Relative lift: mean ratio - 1, delta-method standard error.
        mt, mk = statistics.fmean(tc), statistics.fmean(kc)
        se = math.sqrt(statistics.variance(tc) / 8 / mk**2 + mt**2 * statistics.variance(kc) / 6 / mk**4)
        assert rep["relative_lift"]["estimate"] == pytest.approx(mt / mk - 1, abs=1e-4)
        assert rep["relative_lift"]["se"] == pytest.approx(se, abs=1e-5)
        # Conversion: 6/8 against 4/6.
        assert rep["arms"]["treated"]["conversion_rate"] == pytest.approx(0.75)
        assert rep["conversion_rate_difference"]["estimate"] == pytest.approx(0.75 - 4 / 6, abs=1e-4)
        # Sample ratio: 6 control of 14 against 0.4, Pearson's chi-square with 1 df.
        chi2 = (6 - 14 * 0.4) ** 2 / (14 * 0.4) + (8 - 14 * 0.6) ** 2 / (14 * 0.6)
        assert rep["sample_ratio"]["chi2"] == pytest.approx(chi2, abs=1e-4)
        assert rep["sample_ratio"]["p_value"] == pytest.approx(2 * (1 - statistics.NormalDist().cdf(math.sqrt(chi2))))
        assert rep["sample_ratio"]["mismatch"] is False
        assert rep["cost"]["total"] == 0 and rep["roi"] is None
        assert rep["incremental_margin"]["estimate"] == pytest.approx(w["diff"] * 8 * 0.5, abs=1e-3)
        # The series: one day, 16 decisions of which 15 in the audience (x1 is not), the day's members.
        days = rep["series"]
        assert [d["audience"] for d in days] == [15, 1] and days[0]["members"]["treated"] == 8

        # CUPED: theta = cov(y, x) / var(x) over both arms, y - theta (x - mean x).
        cuped = (
            await st.offers.get(f"/v1/campaigns/{c['id']}/report", params={"cuped": "true", "cap_percentile": 100})
        ).json()
        y = [post for post, _ in TREATED.values()] + [post for post, _ in CONTROL.values()]
        x = [pre for _, pre in TREATED.values()] + [pre for _, pre in CONTROL.values()]
        theta = statistics.covariance(x, y) / statistics.variance(x)
        adj = [yy - theta * (xx - statistics.fmean(x)) for yy, xx in zip(y, x, strict=True)]
        wc = _welch(adj[:8], adj[8:])
        assert cuped["cuped_theta"] == pytest.approx(theta, abs=1e-5)
        assert cuped["incremental_revenue_per_member"]["estimate"] == pytest.approx(wc["diff"], abs=1e-4)
        assert cuped["incremental_revenue_per_member"]["high"] == pytest.approx(wc["high"], abs=1e-3)


async def test_costs_count_coupon_discounts_and_bonus_points(make_stack, clock):
    async with make_stack(global_control_share=0.0) as st:
        await st.templates("t_cost", "email")
        c = await st.create(
            f.campaign("Costs", {"kind": "event", "event_type": "custom", "name": "x"}, "t_cost"), activate=False
        )
        await _seed(st, c["id"], clock.now() - timedelta(days=20))
        before = (await st.offers.get(f"/v1/campaigns/{c['id']}/report")).json()["cost"]
        assert before["total"] == 0 and before["redemptions"] == 0
        # Rows as the coupons API and the crm.loyalty.v1 consumer write them; a rolled-back
        # redemption and another campaign's rows count for nothing.
        async with st.sm() as s, s.begin():
            await s.execute(
                text(
                    "INSERT INTO coupon_redemptions (code, campaign_id, version, customer_id, order_id, discount, "
                    "redeemed_at, rolled_back_at, source) VALUES ('A', :c, 1, 't1', 'o1', 12.5, now(), NULL, 'api'), "
                    "('B', :c, 1, 't3', 'o2', 7.5, now(), NULL, 'event'), "
                    "('C', :c, 1, 't4', 'o3', 100, now(), now(), 'api'), "
                    "('D', 'other', 1, 't4', 'o4', 50, now(), NULL, 'api')"
                ),
                {"c": c["id"]},
            )
            await s.execute(
                text(
                    "INSERT INTO campaign_points (event_id, campaign_id, customer_id, points, value, occurred_at) "
                    "VALUES ('l1', :c, 't1', 200, 2, now()), ('l2', :c, 't6', 400, 4, now()), "
                    "('l3', :c, 't6', -100, -1, now()), ('l4', 'other', 't6', 900, 9, now())"
                ),
                {"c": c["id"]},
            )
        rep = (await st.offers.get(f"/v1/campaigns/{c['id']}/report", params={"margin_rate": 0.4})).json()
        cost = rep["cost"]
        assert (cost["redemptions"], cost["discounts"], cost["points"], cost["points_value"]) == (2, 20, 500, 5)
        assert cost["total"] == 25
        inc = rep["incremental_revenue"]["estimate"]
        assert rep["incremental_margin"]["estimate"] == pytest.approx(inc * 0.4 - 25, abs=1e-3)
        assert rep["roi"]["estimate"] == pytest.approx((inc * 0.4 - 25) / 25, abs=1e-3)


async def test_bad_input_is_refused_naming_the_field(make_stack):
    async with make_stack() as st:
        await st.templates("t_bad", "email")
        r = await st.offers.get("/v1/campaigns/cmp_nope/report")
        assert r.status_code == 404 and r.json()["error"]["code"] == "campaign_not_found"
        r = await st.offers.post(
            "/v1/campaigns/cmp_nope/backtest", json={"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
        )
        assert r.status_code == 404
        c = await st.create(f.campaign("B", {"kind": "inactivity", "days": 30}, "t_bad"), activate=False)
        for params, field in (
            ({"cap_percentile": 101}, "cap_percentile"),
            ({"cap_percentile": "high"}, "cap_percentile"),
            ({"cuped": "perhaps"}, "cuped"),
            ({"margin_rate": -0.1}, "margin_rate"),
        ):
            r = await st.offers.get(f"/v1/campaigns/{c['id']}/report", params=params)
            assert r.status_code == 422, (params, r.text)
            assert ["query", field] in [e["loc"] for e in r.json()["error"]["details"]], r.text
        for body, field in (
            ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, []),
            ({"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00Z"}, ["from"]),
            ({"to": "2026-01-02T00:00:00Z"}, ["from"]),
            ({"from": "2024-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}, []),
        ):
            r = await st.offers.post(f"/v1/campaigns/{c['id']}/backtest", json=body)
            assert r.status_code == 422, (body, r.text)
            assert ["body", *field] in [e["loc"] for e in r.json()["error"]["details"]], r.text
        # attribution_days: 1-90, refused naming the field.
        for days in (0, 91, "week"):
            body = f.campaign("A", {"kind": "inactivity", "days": 30}, "t_bad", attribution_days=days)
            r = await st.offers.post("/v1/campaigns", json=body)
            assert r.status_code == 422, r.text
            assert "attribution_days" in r.text
        assert c["definition"]["attribution_days"] == 7
        # A trigger offers cannot replay: 422 naming it.
        v = await st.create(f.campaign("V", {"kind": "event", "event_type": "product_viewed"}, "t_bad"), activate=False)
        r = await st.offers.post(
            f"/v1/campaigns/{v['id']}/backtest", json={"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
        )
        assert r.status_code == 422 and "product_viewed" in r.json()["error"]["message"]


def _bucket(salt: str, customer: str) -> float:
    import hashlib

    return int(hashlib.md5(f"{salt}:{customer}".encode()).hexdigest()[:8], 16) / 4294967296.0


def _wine(customer: str, at: Any, total: str, category: str = "wine") -> dict[str, Any]:
    p = f.purchase(customer, at, total)
    p["properties"]["items"][0]["category"] = category
    return p


async def test_backtest_replays_purchase_and_inactivity_triggers_without_writing(make_stack, clock):
    from offers.settings import TOPIC_EVENTS

    async with make_stack(global_control_share=0.0) as st:
        await st.templates("t_bt", "email")
        now = clock.now()
        d0 = now - timedelta(days=60)
        customers = [f"b{i}" for i in range(30)]
        events = []
        for i, k in enumerate(customers):
            # Wine at d0 (b0-b19), bread for the rest; every one buys 25 three days later, 7 more 20 days later.
            events.append(_wine(k, d0 + timedelta(hours=i), "40", "wine" if i < 20 else "bread"))
            events.append(_wine(k, d0 + timedelta(days=3), "25", "bread"))
            if i % 2:
                events.append(_wine(k, d0 + timedelta(days=20), "7", "bread"))
        await st.publish(TOPIC_EVENTS, events)

        async def recorded() -> bool:
            return (await st.sql("SELECT count(*) AS n FROM purchases"))[0]["n"] == len(events)

        from crm_common.testing.helpers import eventually

        await eventually(recorded, what="the purchases")
        wine = await st.create(
            f.campaign(
                "After wine",
                {"kind": "event", "event_type": "purchase", "properties": {"category": "wine"}},
                "t_bt",
                control_share=0.3,
                attribution_days=5,
            ),
            activate=False,
        )
        period = {"from": (d0 - timedelta(days=1)).isoformat(), "to": (d0 + timedelta(days=2)).isoformat()}
        r = await st.offers.post(f"/v1/campaigns/{wine['id']}/backtest", json=period)
        assert r.status_code == 200, r.text
        bt = r.json()
        assert bt["evaluated"] == 20 and bt["from"] == period["from"].replace("+00:00", "Z")
        arms = {c["customer_id"]: c["arm"] for c in bt["customers"]}
        expected = {k: "control" if _bucket(wine["id"], k) < 0.3 else "treated" for k in customers[:20]}
        assert arms == expected
        # What they bought after: the 25 three days later (the triggering wine itself not counted).
        assert {c["revenue"] for c in bt["customers"]} == {25.0}
        n_t = sum(1 for a in expected.values() if a == "treated")
        assert bt["arms"]["treated"] == {
            "members": n_t,
            "converted": n_t,
            "revenue": 25.0 * n_t,
            "revenue_per_member": 25.0,
        }

        # Inactivity over the purchase history: 10 days without a purchase after the last one.
        lapse = await st.create(
            f.campaign(
                "Lapsed",
                {"kind": "inactivity", "days": 10},
                "t_bt",
                control_share=0.0,
                limits={"once_per_customer": True},
            ),
            activate=False,
        )
        period = {"from": d0.isoformat(), "to": (d0 + timedelta(days=40)).isoformat()}
        bt = (await st.offers.post(f"/v1/campaigns/{lapse['id']}/backtest", json=period)).json()
        # Everyone lapses 10 days after the purchase on day 3; the odd ones again 10 days after day 20 (once only).
        assert bt["evaluated"] == 30 + 15 and bt["outcomes"] == {"requested": 30, "once_per_customer": 15}
        at = {c["customer_id"]: c["at"] for c in bt["customers"]}
        assert at["b1"].startswith((d0 + timedelta(days=13)).date().isoformat())
        revenue = {c["customer_id"]: c["revenue"] for c in bt["customers"]}
        assert revenue["b1"] == 7 and revenue["b2"] == 0
        # Nothing was written or sent.
        assert (await st.sql("SELECT count(*) AS n FROM decisions"))[0]["n"] == 0
        assert (await st.sql("SELECT count(*) AS n FROM outbox WHERE sent_at IS NULL"))[0]["n"] == 0
