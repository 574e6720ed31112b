"""Points-multiplier offers from offers' message requests: recorded, applied to one accrual, reversed by refunds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

from crm_common.contract.messages import LoyaltyEvent, MessageRequested
from loyalty import point_offers, reports
from loyalty.ledger import load_programme
from loyalty.settings import TOPIC_LOYALTY

from . import factories as f
from .conftest import apply, balance, check_invariants, ledger, outbox, set_programme

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
D = Decimal


async def request(sm: Any, now: datetime, *messages: dict[str, Any]) -> int:
    """Apply message requests as loyalty's crm.messages.v1 handler does, in one transaction."""
    async with sm() as s:
        n = await point_offers.record_requests(
            session=s,
            messages=[MessageRequested.model_validate(m) for m in messages],
            programme=await load_programme(s),
            now=now,
        )
        await s.commit()
    return n


async def loyalty_events(sm: Any) -> list[LoyaltyEvent]:
    return [LoyaltyEvent.model_validate(m) for m in await outbox(sm, TOPIC_LOYALTY)]


async def offer_row(sm: Any, message_id: str) -> Any:
    async with sm() as s:
        return (
            await s.execute(
                text("SELECT order_id, points, points_reversed FROM point_offers WHERE message_id = :m"),
                {"m": message_id},
            )
        ).one()


async def test_the_first_purchase_within_validity_earns_the_multiplier_once(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(sm, T0, f.purchase("c1", "before", "50", T0 - timedelta(hours=1)))
    assert await request(sm, T0, f.offer_request("c1", "ofr-1", T0, multiplier="2", valid_until="2026-01-12")) == 1
    await apply(
        sm,
        T0 + timedelta(hours=2),
        f.purchase("c1", "o1", "100", T0 + timedelta(hours=1), event_id="e1"),
        f.purchase("c1", "o2", "100", T0 + timedelta(hours=2), event_id="e2"),
    )
    # 50 (before the request: no bonus) + 100 + 100 extra for o1 + 100 for o2 (the offer is used once).
    assert await balance(sm, "c1") == D("350")
    kinds = [(k, p, ref) for k, p, ref in await ledger(sm, "c1")]
    assert ("offer_bonus", D("100"), "offer_bonus:ofr-1") in kinds
    assert [k for k, _, _ in kinds].count("offer_bonus") == 1
    assert tuple(await offer_row(sm, "ofr-1")) == ("o1", D("100"), D("0"))
    (bonus,) = [e for e in await loyalty_events(sm) if e.data.get("reason") == "offer_bonus"]
    assert bonus.type == "points.accrued" and bonus.points == D("100") and bonus.balance == D("250")
    assert bonus.data["campaign_id"] == "cmp-1" and bonus.data["offer_id"] == "cmp-1:v1"
    assert (D(bonus.data["campaign_points"]), D(bonus.data["point_value"]), D(bonus.data["value"])) == (
        D("100"),
        D("0.01"),
        D("1.00"),
    )
    await check_invariants(sm, "c1")


async def test_a_purchase_after_valid_until_or_before_the_request_gets_no_multiplier(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await request(sm, T0, f.offer_request("c2", "ofr-2", T0, multiplier="3", valid_until="2026-01-06"))
    await apply(
        sm,
        T0 + timedelta(days=2),
        f.purchase("c2", "early", "100", T0 - timedelta(minutes=1)),
        f.purchase("c2", "late", "100", datetime(2026, 1, 7, 0, 0, tzinfo=UTC)),  # valid through Jan 6 (UTC)
    )
    assert await balance(sm, "c2") == D("200")
    assert "offer_bonus" not in [k for k, _, _ in await ledger(sm, "c2")]
    assert (await offer_row(sm, "ofr-2")).order_id is None
    # The last second of the valid day still counts.
    await apply(sm, T0 + timedelta(days=2), f.purchase("c2", "edge", "10", datetime(2026, 1, 6, 23, 59, tzinfo=UTC)))
    assert await balance(sm, "c2") == D("230")  # 10 + 20 extra at x3
    await check_invariants(sm, "c2")


async def test_redelivery_of_the_request_or_the_purchase_changes_nothing(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    msg = f.offer_request("c3", "ofr-3", T0, valid_until="2026-01-10")
    p = f.purchase("c3", "o1", "100", T0 + timedelta(hours=1), event_id="e1")
    assert await request(sm, T0, msg) == 1
    await apply(sm, T0, p)
    assert await request(sm, T0, msg, msg) == 0
    await apply(sm, T0, p)
    await apply(sm, T0, f.purchase("c3", "o1", "100", T0 + timedelta(hours=1), event_id="e1-resent"))
    assert await balance(sm, "c3") == D("200")
    assert len([e for e in await loyalty_events(sm) if e.data.get("reason") == "offer_bonus"]) == 1
    await check_invariants(sm, "c3")


async def test_a_refund_reverses_the_bonus_with_the_purchase(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await request(sm, T0, f.offer_request("c4", "ofr-4", T0, multiplier="1.5", valid_until="2026-01-10"))
    await apply(sm, T0, f.purchase("c4", "o1", "200", T0 + timedelta(hours=1)))
    assert await balance(sm, "c4") == D("300")  # 200 + 100 extra
    await apply(sm, T0, f.refund("c4", "o1", "50", T0 + timedelta(days=1), event_id="r1"))
    assert await balance(sm, "c4") == D("225")  # a quarter of each: 50 + 25
    await apply(sm, T0, f.refund("c4", "o1", "150", T0 + timedelta(days=2), event_id="r2"))
    await apply(sm, T0, f.refund("c4", "o1", "150", T0 + timedelta(days=2), event_id="r2"))
    assert await balance(sm, "c4") == D("0")
    assert tuple(await offer_row(sm, "ofr-4")) == ("o1", D("100"), D("100"))
    reversed_ = [e for e in await loyalty_events(sm) if e.data.get("reverses") == "offer_bonus"]
    assert [(e.points, e.data["campaign_id"], D(e.data["campaign_points"])) for e in reversed_] == [
        (D("-25"), "cmp-1", D("-25")),
        (D("-75"), "cmp-1", D("-75")),
    ]
    await check_invariants(sm, "c4")
    # The programme report counts the bonus as issued and its reversal as reversed.
    async with sm() as s:
        report = await reports.programme_report(session=s)
    assert sum(m.issued for m in report.months) == D("300")
    assert sum(m.reversed for m in report.months) == D("300")


async def test_an_offer_that_arrives_after_the_purchase_it_covers_is_booked_then(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await apply(
        sm,
        T0,
        f.purchase("c5", "o1", "100", T0 + timedelta(hours=1)),
        f.purchase("c5", "o2", "40", T0 + timedelta(hours=2)),
    )
    await request(sm, T0 + timedelta(hours=3), f.offer_request("c5", "ofr-5", T0, valid_until="2026-01-10"))
    assert await balance(sm, "c5") == D("240")  # o1 (the first covered purchase) doubled
    assert (await offer_row(sm, "ofr-5")).order_id == "o1"
    # A second offer for the same customer waits for a purchase no offer used.
    await request(sm, T0 + timedelta(hours=3), f.offer_request("c5", "ofr-5b", T0, campaign_id="cmp-2"))
    assert (await offer_row(sm, "ofr-5b")).order_id == "o2"
    assert await balance(sm, "c5") == D("280")
    await check_invariants(sm, "c5")


async def test_the_highest_multiplier_of_open_offers_is_used_and_others_stay_open(db):
    _, sm = db
    await set_programme(sm, f.SCENARIO4_PROGRAMME, T0)
    await request(
        sm,
        T0,
        f.offer_request("c6", "ofr-a", T0, multiplier="2", valid_until="2026-01-20", campaign_id="a"),
        f.offer_request("c6", "ofr-b", T0, multiplier="3", valid_until="2026-01-20", campaign_id="b"),
        f.offer_request("c6", "ignored", T0, offer_kind="percent"),
    )
    await apply(sm, T0, f.purchase("c6", "o1", "100", T0 + timedelta(hours=1)))
    assert await balance(sm, "c6") == D("300")
    assert (await offer_row(sm, "ofr-b")).order_id == "o1"
    assert (await offer_row(sm, "ofr-a")).order_id is None
    await apply(sm, T0, f.purchase("c6", "o2", "100", T0 + timedelta(hours=2)))
    assert (await offer_row(sm, "ofr-a")).order_id == "o2"
    assert await balance(sm, "c6") == D("500")
    async with sm() as s:
        assert (await s.execute(text("SELECT count(*) FROM point_offers"))).scalar() == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"multiplier": "1"}, "multiplier"),
        ({"multiplier": "lots"}, "multiplier"),
        ({"valid_until": "soon"}, "valid_until"),
    ],
)
async def test_an_unusable_offer_is_refused_naming_what_is_wrong(db, change, field):
    _, sm = db
    msg = f.offer_request("c7", "ofr-7", T0)
    msg["variables"].update(change)
    with pytest.raises(point_offers.UnusableOffer, match=field):
        await request(sm, T0, msg)
    no_campaign = f.offer_request("c7", "ofr-8", T0)
    no_campaign["campaign_id"] = None
    with pytest.raises(point_offers.UnusableOffer, match="campaign_id"):
        await request(sm, T0, no_campaign)
