"""crm.loyalty.v1 in offers, with the loyalty service running: a points-multiplier campaign's bonus is booked by
loyalty and its cost recorded in `campaign_points`; the balance and tier personalise later messages."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from crm_common.testing.helpers import eventually, run_app
from loyalty.app import create_app as loyalty_app
from loyalty.settings import Settings as LoyaltySettings
from offers.settings import TOPIC_EVENTS, TOPIC_LOYALTY

from . import factories as f
from .conftest import stack_settings

D = Decimal
PROGRAMME = {
    "base_rate": "0.01",
    "point_value": "0.01",
    "tiers": [{"name": "gold", "min_spend": "1000", "rate": "0.02"}],
}


async def test_a_multiplier_campaigns_bonus_is_booked_by_loyalty_and_counted_as_campaign_cost(
    make_stack, make_database, broker, topic_prefix, clock
):
    loyalty_settings = LoyaltySettings(**stack_settings(await make_database("loyalty"), broker, topic_prefix))
    async with make_stack(global_control_share=0.0) as st, run_app(loyalty_app(loyalty_settings, clock=clock)) as ly:
        assert (await ly.put("/v1/programme", json=PROGRAMME)).status_code == 200
        await st.templates("t_x2", "email")
        now = clock.now()
        await st.publish(TOPIC_EVENTS, [f.purchase("ann", now - timedelta(days=1), total="50")])

        async def cached(balance: str) -> Any:
            rows = await st.sql("SELECT points_balance, loyalty_tier FROM customer_loyalty WHERE customer_id = 'ann'")
            return rows[0] if rows and rows[0]["points_balance"] == D(balance) else None

        await eventually(lambda: cached("50"), timeout=40, what="ann's balance from crm.loyalty.v1")
        c = await st.create(
            f.campaign(
                "Double points",
                {"kind": "event", "event_type": "custom", "name": "opened"},
                "t_x2",
                offer={"kind": "points_multiplier", "multiplier": "2", "validity_days": 7},
                control_share=0,
            )
        )
        await st.publish(TOPIC_EVENTS, [f.event("custom", "ann", now, {"name": "opened"})])
        assert await st.wait_decisions(1, c["id"]) == {"ann": "requested"}
        [msg] = await st.requested(c["id"])
        assert msg["variables"]["offer_kind"] == "points_multiplier"
        assert (msg["variables"]["points_balance"], msg["variables"]["loyalty_tier"]) == ("50", "")

        # Loyalty doubles the next purchase's 100 points; offers records the 100 extra as the campaign's cost.
        order = f.purchase("ann", now + timedelta(minutes=5), total="100")
        await st.publish(TOPIC_EVENTS, [order])

        async def points() -> list[dict[str, Any]] | None:
            rows = await st.sql(
                "SELECT campaign_id, offer_id, customer_id, points, value FROM campaign_points ORDER BY occurred_at"
            )
            return rows or None

        rows = await eventually(points, timeout=40, what="the campaign's bonus points")
        assert rows == [
            {
                "campaign_id": c["id"],
                "offer_id": f"{c['id']}:v1",
                "customer_id": "ann",
                "points": D("100"),
                "value": D("1.0000"),
            }
        ]
        assert (await ly.get("/v1/accounts/ann")).json()["balance"] in ("250", "250.00")
        await eventually(lambda: cached("250"), timeout=40, what="ann's balance after the bonus")

        # A full refund reverses the bonus: the campaign's cost falls back to zero.
        refund = f.event(
            "refund", "ann", now + timedelta(hours=1), {"order_id": order["properties"]["order_id"], "amount": "100"}
        )
        await st.publish(TOPIC_EVENTS, [refund])

        async def reversed_() -> Any:
            rows = await st.sql("SELECT sum(points) AS p, sum(value) AS v, count(*) AS n FROM campaign_points")
            return rows[0] if rows[0]["n"] == 2 else None

        total = await eventually(reversed_, timeout=40, what="the bonus reversal")
        assert (total["p"], total["v"]) == (D("0"), D("0"))


async def test_loyalty_events_are_recorded_once_and_only_those_naming_a_campaign(make_stack, clock):
    async with make_stack(global_control_share=0.0) as st:
        now = clock.now()

        def event(msg_id: str, type_: str, points: str | None, balance: str | None, **data: Any) -> dict[str, Any]:
            return {
                "id": msg_id,
                "type": type_,
                "customer_id": "bo",
                "occurred_at": now.isoformat(),
                "points": points,
                "balance": balance,
                "data": data,
            }

        bonus = event("l1", "points.accrued", "30", "130", campaign_id="cmp", offer_id="cmp:v2", campaign_points="30")
        plain = event("l2", "points.accrued", "10", "140")
        foreign = event("l3", "points.adjusted", "5", "145", campaign_id="cmp")  # no point value: value unknown
        tier = event("l4", "tier.changed", None, None, to="gold")
        await st.publish(TOPIC_LOYALTY, [bonus, plain, bonus, foreign, tier])

        async def tiered() -> Any:
            rows = await st.sql("SELECT points_balance, loyalty_tier FROM customer_loyalty WHERE customer_id = 'bo'")
            return rows[0] if rows and rows[0]["loyalty_tier"] == "gold" else None

        assert await eventually(tiered, timeout=30, what="bo's tier") == {
            "points_balance": D("145"),
            "loyalty_tier": "gold",
        }
        rows = await st.sql("SELECT event_id, campaign_id, offer_id, points, value FROM campaign_points ORDER BY 1")
        assert rows == [
            {"event_id": "l1", "campaign_id": "cmp", "offer_id": "cmp:v2", "points": D("30"), "value": None},
            {"event_id": "l3", "campaign_id": "cmp", "offer_id": None, "points": D("5"), "value": None},
        ]
