"""Coupons through the real stack: codes drawn from `secrets` and stored with their decision, the code in
the message is the stored one, the POS validates and redeems (idempotent by order, one winner among
concurrent orders), roll back by the API and by the order's refund, a purchase event and an API
redemption of one order count once, and hostile input is a 422 naming the field."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

from crm_common.testing.helpers import eventually
from offers import codes, coupons
from offers.settings import TOPIC_EVENTS

from . import factories as f

NO_GLOBAL = {"global_control_share": 0.0}
WINE_OFFER = {
    "kind": "percent",
    "value": "20",
    "target": "skus",
    "skus": ["wine-1", "wine-2"],
    "min_basket": "30",
    "min_quantity": 2,
    "validity_days": 14,
    "coupon_pattern": "WINE-XXXXX-XXXXX",
}
DEALS_OFFER = {"kind": "fixed", "value": "5", "validity_days": 7, "max_uses": 2, "max_uses_per_customer": 1}
WINE_BASKET = [
    {"sku": "wine-1", "category": "wine", "quantity": "2", "price": "12.50"},
    {"sku": "bread", "category": "bakery", "quantity": "1", "price": "10"},
]


def visit(k: str, at: Any, page: str, event_id: str | None = None) -> dict[str, Any]:
    return f.event("site_visit", k, at, {"page": page}, event_id=event_id)


def campaign(name: str, page: str, offer: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return f.campaign(
        name,
        {"kind": "event", "event_type": "site_visit", "properties": {"page": page}},
        "t_coupon",
        offer=offer,
        limits={"collision_minutes": 0},
        **{"control_share": 0, **kw},
    )


@asynccontextmanager
async def coupon_stack(make_stack: Any, clock: Any, customers: list[str]) -> AsyncIterator[tuple[Any, dict]]:
    """A stack with the wine campaign (20% on two SKUs) and the deals one (5 off, two uses per code, one per
    customer), each fired for `customers` by a site visit; yields (stack, {customer: wine code})."""
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_coupon", "email", body="Hi {{ first_name }}: {{ discount }} with {{ coupon_code }}")
        wine = await st.create(campaign("Wine", "/wine", WINE_OFFER))
        deals = await st.create(campaign("Deals", "/deals", DEALS_OFFER))
        at = clock.now() - timedelta(minutes=1)
        await st.publish(TOPIC_EVENTS, [visit(k, at, "/wine") for k in customers])
        await st.wait_decisions(len(customers), wine["id"])
        rows = await st.sql("SELECT customer_id, code FROM coupons WHERE campaign_id = :c", c=wine["id"])
        st.wine, st.deals = wine, deals
        yield st, {r["customer_id"]: r["code"] for r in rows}


async def execute(st: Any, query: str, **params: Any) -> None:
    async with st.sm() as s:
        await s.execute(text(query), params)
        await s.commit()


async def post(st: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await st.offers.post(path, json=body)
    assert r.status_code < 500, r.text
    return r.status_code, r.json()


def basket(code: str, k: str, lines: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    return {"code": code, "customer_id": k, "lines": WINE_BASKET if lines is None else lines, **kw}


def test_codes_follow_the_pattern_over_an_unambiguous_alphabet_with_40_bits_and_do_not_repeat():
    assert not set("0O1IL") & set(codes.ALPHABET) and len(set(codes.ALPHABET)) == len(codes.ALPHABET) == 30
    drawn = [codes.generate(codes.DEFAULT_PATTERN) for _ in range(10_000)]
    shape = re.compile(rf"[{codes.ALPHABET}]{{4}}-[{codes.ALPHABET}]{{4}}-[{codes.ALPHABET}]{{4}}")
    assert all(shape.fullmatch(c) for c in drawn)
    assert len(set(drawn)) == len(drawn)
    # Every symbol drawn about as often (12 per code x 10,000 codes / 30 symbols = 4,000 each).
    counts = Counter("".join(drawn).replace("-", ""))
    assert set(counts) == set(codes.ALPHABET)
    assert all(3_600 < n < 4_400 for n in counts.values()), counts
    assert codes.pattern_bits(codes.DEFAULT_PATTERN) == pytest.approx(12 * math.log2(30))
    wine = [codes.generate("WINE-XXXXX-XXXXX") for _ in range(1_000)]
    assert all(re.fullmatch(rf"WINE-[{codes.ALPHABET}]{{5}}-[{codes.ALPHABET}]{{5}}", c) for c in wine)
    assert codes.check_pattern("WINE-XXXXX-XXXXX")
    with pytest.raises(ValueError, match=r"39\.3 bits"):
        codes.check_pattern("WINE-XXXX-XXXX")  # 8 symbols of 30 are 39.3 bits
    for bad in ("wine-xxxxx-xxxxx", "XXXXXXXXXX YY", "X" * 65, ""):
        with pytest.raises(ValueError):
            codes.check_pattern(bad)
    # Codes are read as a cashier types them; anything that cannot be one is refused.
    assert codes.normalise(" wine-7kq3m-hx9td ") == "WINE-7KQ3M-HX9TD"
    for bad in ("WINE\x00X", "ＷＩＮＥ", "CAFÉ-1234", "A" * 65, "WINE 1234", ""):
        assert codes.normalise(bad) is None, bad


async def test_a_pattern_under_40_bits_is_a_422_naming_offer_coupon_pattern(make_stack):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_coupon", "email")
        for pattern in ("WINE-XXXX-XXXX", "wine-xxxxx-xxxxx", "XXXXX\x00XXXXX"):
            r = await st.offers.post(
                "/v1/campaigns", json=campaign("Weak", "/x", {**WINE_OFFER, "coupon_pattern": pattern})
            )
            assert r.status_code == 422, r.text
            assert ["body", "offer", "coupon_pattern"] in [e["loc"] for e in r.json()["error"]["details"]], r.text
        assert (await st.sql("SELECT count(*) AS n FROM campaigns"))[0]["n"] == 0


async def test_the_message_carries_the_stored_code_control_gets_none_and_redelivery_draws_no_second(make_stack, clock):
    async with make_stack(**NO_GLOBAL) as st:
        await st.templates("t_coupon", "email", body="{{ discount }} with {{ coupon_code }}")
        c = await st.create(campaign("Half held", "/wine", WINE_OFFER, control_share=0.5))
        at = clock.now() - timedelta(minutes=1)
        events = [visit(f"k{i:02d}", at, "/wine", event_id=f"v{i}") for i in range(30)]
        await st.publish(TOPIC_EVENTS, events)
        decided = await st.wait_decisions(30, c["id"])
        treated = {k for k, o in decided.items() if o == "requested"}
        held = {k for k, o in decided.items() if o == "control"}
        assert treated and held and len(treated | held) == 30
        stored = await st.sql("SELECT * FROM coupons ORDER BY customer_id")
        assert {r["customer_id"] for r in stored} == treated  # the control group gets no code

        # Each request carries its own stored code, and the coupon holds what it gives.
        msgs = await eventually(lambda: _requested(st, c["id"], len(treated)), what="message requests", timeout=30)
        by_message = {r["message_id"]: r for r in stored}
        decisions = {r["message_id"]: r for r in await st.sql("SELECT * FROM decisions WHERE outcome = 'requested'")}
        for m in msgs:
            coupon = by_message[m["id"]]
            assert m["variables"]["coupon_code"] == coupon["code"]
            assert decisions[m["id"]]["variables"]["coupon_code"] == coupon["code"]
            assert re.fullmatch(rf"WINE-[{codes.ALPHABET}]{{5}}-[{codes.ALPHABET}]{{5}}", coupon["code"])
            assert (coupon["campaign_id"], coupon["version"], coupon["customer_id"]) == (
                c["id"],
                1,
                m["customer_id"],
            )
            assert (coupon["kind"], coupon["value"], coupon["target"], coupon["target_skus"]) == (
                "percent",
                Decimal(20),
                "skus",
                ["wine-1", "wine-2"],
            )
            assert (coupon["min_basket"], coupon["min_quantity"], coupon["max_uses"], coupon["uses"]) == (
                Decimal(30),
                2,
                1,
                0,
            )
            assert coupon["valid_from"] == decisions[m["id"]]["at"] == at
            assert coupon["valid_until"] == at + timedelta(days=14)
        assert len({r["code"] for r in stored}) == len(stored)

        # The same events again: the decisions and their coupons exist, nothing new is drawn.
        await st.publish(TOPIC_EVENTS, [*events, visit("late", at, "/wine", event_id="v-late")])
        await st.wait_decisions(31, c["id"])
        again = await st.sql("SELECT code, message_id FROM coupons WHERE customer_id <> 'late' ORDER BY customer_id")
        assert [(r["code"], r["message_id"]) for r in again] == [(r["code"], r["message_id"]) for r in stored]
        # And issuing for a decision that has its coupon returns the stored code, not a second one.
        async with st.sm() as s:
            spec = stored[0]
            from offers.schemas import Offer

            got = await coupons.issue(
                s,
                [
                    {
                        "message_id": spec["message_id"],
                        "campaign_id": c["id"],
                        "version": 1,
                        "customer_id": spec["customer_id"],
                        "at": at,
                        "offer": Offer.model_validate(WINE_OFFER),
                        "variables": {},
                    }
                ],
                clock.now(),
            )
            await s.commit()
        assert got == {spec["message_id"]: spec["code"]}
        assert (await st.sql("SELECT count(*) AS n FROM coupons WHERE customer_id <> 'late'"))[0]["n"] == len(stored)


async def _requested(st: Any, campaign_id: str, n: int) -> list[dict[str, Any]] | None:
    msgs = await st.requested(campaign_id)
    return msgs if len(msgs) >= n else None


async def test_validate_answers_every_reason_and_writes_nothing(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana", "bob"]) as (st, wine):
        code = wine["ana"]
        status, ok = await post(st, "/v1/coupons/validate", basket(code.lower(), "ana"))
        assert status == 200 and ok["valid"] is True and ok["code"] == code
        # 20% of the two bottles (2 x 12.50), not of the bread.
        assert Decimal(ok["discount"]) == Decimal("5.00")
        assert [(a["sku"], Decimal(a["discount"])) for a in ok["applies_to"]] == [("wine-1", Decimal("5.00"))]

        async def reason(body: dict[str, Any]) -> str:
            status, out = await post(st, "/v1/coupons/validate", body)
            assert status == 200 and out["valid"] is False, out
            return out["reason"]  # type: ignore[no-any-return]

        assert await reason(basket(code, "bob")) == "other_customer"
        assert await reason(basket(code, "ana", order_total="29.99")) == "minimum_basket"
        assert (
            await reason(basket(code, "ana", [{"sku": "cheese", "category": "deli", "quantity": 3, "price": "20"}]))
            == "not_applicable"
        )
        one_bottle = [{"sku": "wine-2", "quantity": 1, "price": "40"}]
        assert await reason(basket(code, "ana", one_bottle)) == "minimum_quantity"
        # Used: bob redeems his, then validates it again.
        status, _ = await post(st, "/v1/coupons/redeem", basket(wine["bob"], "bob", order_id="o-bob"))
        assert status == 200
        assert await reason(basket(wine["bob"], "bob")) == "used"
        # Per customer per campaign: two deals codes of ana's (two uses each), one redemption per customer.
        at = clock.now() - timedelta(seconds=30)
        await st.publish(TOPIC_EVENTS, [visit("ana", at, "/deals"), visit("ana", at, "/deals")])
        await st.wait_decisions(2, st.deals["id"])
        deals = [
            r["code"]
            for r in await st.sql("SELECT code FROM coupons WHERE campaign_id = :c ORDER BY code", c=st.deals["id"])
        ]
        assert len(deals) == 2
        status, got = await post(st, "/v1/coupons/redeem", basket(deals[0], "ana", order_id="o-d1"))
        assert status == 200 and Decimal(got["discount"]) == Decimal("5.00")
        assert await reason(basket(deals[1], "ana")) == "customer_limit"
        # Not yet valid (a coupon whose validity starts later), and expired once the clock passes 14 days.
        await execute(
            st, "UPDATE coupons SET valid_from = :t WHERE code = :c", t=clock.now() + timedelta(hours=1), c=code
        )
        assert await reason(basket(code, "ana")) == "not_yet_valid"
        await execute(st, "UPDATE coupons SET valid_from = :t WHERE code = :c", t=at, c=code)
        clock.advance(days=14)
        assert await reason(basket(code, "ana")) == "expired"
        # Unknown: 404 with its reason code.
        r = await st.offers.post("/v1/coupons/validate", json=basket("WINE-22222-22222", "ana"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_code", r.text
        assert r.json()["error"]["details"]["reason"] == "unknown_code"
        # Validation wrote nothing: the only redemptions are the two redeemed above.
        rows = await st.sql("SELECT order_id FROM coupon_redemptions ORDER BY order_id")
        assert [r["order_id"] for r in rows] == ["o-bob", "o-d1"]


async def test_redeem_is_idempotent_by_order_and_refuses_with_409_reasons(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana", "bob", "cy"]) as (st, wine):
        code = wine["ana"]
        status, first = await post(st, "/v1/coupons/redeem", basket(code, "ana", order_id="o1"))
        assert status == 200, first
        assert (first["state"], first["source"], Decimal(first["discount"])) == ("applied", "api", Decimal("5.00"))
        assert Decimal(first["order_total"]) == Decimal("35")
        status, again = await post(st, "/v1/coupons/redeem", basket(code, "ana", order_id="o1"))
        assert status == 200 and again == first

        async def refused(body: dict[str, Any], why: str) -> None:
            status, out = await post(st, "/v1/coupons/redeem", body)
            assert status == 409 and out["error"]["code"] == why, out
            assert out["error"]["details"]["reason"] == why

        await refused(basket(code, "ana", order_id="o2"), "used")
        await refused(basket(code, "bob", order_id="o1"), "other_customer")
        await refused(basket(wine["bob"], "bob", order_id="o3", order_total="20"), "minimum_basket")
        await refused(
            basket(wine["bob"], "bob", [{"sku": "x", "quantity": 9, "price": "9"}], order_id="o3"), "not_applicable"
        )
        r = await st.offers.post("/v1/coupons/redeem", json=basket("ZZZZ-ZZZZ-ZZZZ", "ana", order_id="o4"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_code"
        clock.advance(days=14, seconds=1)
        await refused(basket(wine["cy"], "cy", order_id="o5"), "expired")

        coupon = (await st.offers.get(f"/v1/coupons/{code.lower()}")).json()
        assert (coupon["state"], coupon["uses"], coupon["max_uses"]) == ("used", 1, 1)
        assert [x["order_id"] for x in coupon["redemptions"]] == ["o1"]
        assert (await st.offers.get(f"/v1/coupons/{wine['cy']}")).json()["state"] == "expired"
        listed = (await st.offers.get("/v1/customers/ana/coupons")).json()
        assert [x["code"] for x in listed] == [code] and listed[0]["state"] == "used"
        assert (await st.offers.get("/v1/coupons/ZZZZ-ZZZZ-ZZZZ")).status_code == 404
        # Nothing half-applied: one redemption, one use.
        rows = await st.sql(
            "SELECT code, order_id, discount, campaign_id, version, customer_id, source FROM coupon_redemptions"
        )
        assert rows == [
            {
                "code": code,
                "order_id": "o1",
                "discount": Decimal("5.0000"),
                "campaign_id": st.wine["id"],
                "version": 1,
                "customer_id": "ana",
                "source": "api",
            }
        ]


async def test_of_20_concurrent_orders_on_one_code_exactly_one_wins(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana", "bob"]) as (st, wine):
        results = await asyncio.gather(
            *(post(st, "/v1/coupons/redeem", basket(wine["ana"], "ana", order_id=f"race-{i}")) for i in range(20))
        )
        statuses = Counter(s for s, _ in results)
        assert statuses == {200: 1, 409: 19}, results
        assert {out["error"]["code"] for s, out in results if s == 409} == {"used"}
        rows = await st.sql("SELECT uses FROM coupons WHERE code = :c", c=wine["ana"])
        assert rows == [{"uses": 1}]
        assert (await st.sql("SELECT count(*) AS n FROM coupon_redemptions"))[0]["n"] == 1
        # The same order 20 times at once: one redemption, 20 equal answers.
        same = await asyncio.gather(
            *(post(st, "/v1/coupons/redeem", basket(wine["bob"], "bob", order_id="one")) for _ in range(20))
        )
        assert {s for s, _ in same} == {200} and all(out == same[0][1] for _, out in same)
        assert (await st.sql("SELECT count(*) AS n FROM coupon_redemptions WHERE order_id = 'one'"))[0]["n"] == 1


async def test_rollback_explicit_and_by_the_orders_refund_gives_the_use_back(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana"]) as (st, wine):
        code = wine["ana"]
        assert (await post(st, "/v1/coupons/redeem", basket(code, "ana", order_id="o1")))[0] == 200
        status, out = await post(st, f"/v1/coupons/{code}/rollback", {"order_id": "o1"})
        assert status == 200 and out["state"] == "rolled_back" and out["rolled_back_at"]
        status, again = await post(st, f"/v1/coupons/{code}/rollback", {"order_id": "o1"})
        assert status == 200 and again == out
        assert (await st.sql("SELECT uses FROM coupons WHERE code = :c", c=code)) == [{"uses": 0}]
        status, missing = await post(st, f"/v1/coupons/{code}/rollback", {"order_id": "never"})
        assert status == 404 and missing["error"]["code"] == "redemption_not_found"
        status, missing = await post(st, "/v1/coupons/ZZZZ-ZZZZ-ZZZZ/rollback", {"order_id": "o1"})
        assert status == 404 and missing["error"]["code"] == "unknown_code"

        # The use is back: another order redeems it, and that order's refund on crm.events.v1 rolls it back.
        assert (await post(st, "/v1/coupons/redeem", basket(code, "ana", order_id="o2")))[0] == 200
        refund = f.event("refund", "ana", clock.now(), {"order_id": "o2", "amount": "20.00"})
        await st.publish(
            TOPIC_EVENTS, [refund, f.event("refund", "ana", clock.now(), {"order_id": "o-other", "amount": "1"})]
        )

        async def rolled_back() -> bool:
            rows = await st.sql("SELECT rolled_back_at FROM coupon_redemptions WHERE order_id = 'o2'")
            return rows[0]["rolled_back_at"] is not None

        await eventually(rolled_back, what="the refund's roll back")
        assert (await st.sql("SELECT uses FROM coupons WHERE code = :c", c=code)) == [{"uses": 0}]
        coupon = (await st.offers.get(f"/v1/coupons/{code}")).json()
        assert coupon["state"] == "active" and [x["state"] for x in coupon["redemptions"]] == [
            "rolled_back",
            "rolled_back",
        ]
        # The cashier re-applies it to the same order: applied again, one use.
        status, re_applied = await post(st, "/v1/coupons/redeem", basket(code, "ana", order_id="o1"))
        assert status == 200 and re_applied["state"] == "applied"
        assert (await st.sql("SELECT uses FROM coupons WHERE code = :c", c=code)) == [{"uses": 1}]


def _purchase(k: str, at: Any, order_id: str, code: str) -> dict[str, Any]:
    return f.event(
        "purchase",
        k,
        at,
        {
            "order_id": order_id,
            "items": [
                {"sku": "wine-1", "category": "wine", "quantity": "2", "unit_price": "12.50", "discount": "5"},
                {"sku": "bread", "category": "bakery", "quantity": "1", "unit_price": "10"},
            ],
            "total": "30",
            "currency": "EUR",
            "coupon_code": code,
        },
    )


async def test_a_purchase_event_with_coupon_code_and_an_api_redemption_of_one_order_count_once(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana", "bob", "cy"]) as (st, wine):
        now = clock.now()
        # Event first, then the API for the same order: the API answers the event's redemption.
        # bob's purchase carries ana's code: it redeems nothing. cy's code is redeemed by the API first.
        assert (await post(st, "/v1/coupons/redeem", basket(wine["cy"], "cy", order_id="cy-1")))[0] == 200
        await st.publish(
            TOPIC_EVENTS,
            [
                _purchase("ana", now, "ana-1", wine["ana"].lower()),
                _purchase("bob", now, "bob-1", wine["ana"]),
                _purchase("cy", now, "cy-1", wine["cy"]),
            ],
        )

        await eventually(lambda: _purchases_seen(st, 3), what="all three purchases applied (customer facts)")
        rows = await st.sql("SELECT customer_id, order_id, source, discount FROM coupon_redemptions ORDER BY order_id")
        assert rows == [
            {"customer_id": "ana", "order_id": "ana-1", "source": "event", "discount": Decimal("5.0000")},
            {"customer_id": "cy", "order_id": "cy-1", "source": "api", "discount": Decimal("5.0000")},
        ]
        status, out = await post(st, "/v1/coupons/redeem", basket(wine["ana"], "ana", order_id="ana-1"))
        assert status == 200 and out["source"] == "event"
        uses = await st.sql("SELECT customer_id, uses FROM coupons ORDER BY customer_id")
        assert uses == [
            {"customer_id": "ana", "uses": 1},
            {"customer_id": "bob", "uses": 0},
            {"customer_id": "cy", "uses": 1},
        ]
        assert (await st.sql("SELECT count(*) AS n FROM coupon_redemptions"))[0]["n"] == 2


async def _purchases_seen(st: Any, n: int) -> bool:
    rows = await st.sql("SELECT coalesce(sum(purchases), 0) AS n FROM customers")
    return int(rows[0]["n"]) >= n


async def test_hostile_codes_and_baskets_are_422_naming_the_field_and_change_nothing(make_stack, clock):
    async with coupon_stack(make_stack, clock, ["ana"]) as (st, wine):
        code = wine["ana"]
        line = {"sku": "wine-1", "quantity": "2", "price": "12.50"}
        cases: list[tuple[dict[str, Any], list[Any]]] = [
            (basket("WINE\x00-22222", "ana", order_id="h"), ["body", "code"]),
            (basket("W" * 100, "ana", order_id="h"), ["body", "code"]),
            (basket("ＷＩＮＥ-ＸＸＸＸＸ", "ana", order_id="h"), ["body", "code"]),
            (basket("WINE-\u200b2222", "ana", order_id="h"), ["body", "code"]),
            (basket(code, "ana\x00", order_id="h"), ["body", "customer_id"]),
            (basket(code, "ana", order_id="h\x00"), ["body", "order_id"]),
            (basket(code, "ana", order_id="x" * 200), ["body", "order_id"]),
            (basket(code, "ana", [{**line, "quantity": "-1"}], order_id="h"), ["body", "lines", 0, "quantity"]),
            (basket(code, "ana", [{**line, "quantity": "10000000"}], order_id="h"), ["body", "lines", 0, "quantity"]),
            (basket(code, "ana", [{**line, "price": "-5"}], order_id="h"), ["body", "lines", 0, "price"]),
            (basket(code, "ana", [{**line, "price": "1e30"}], order_id="h"), ["body", "lines", 0, "price"]),
            (basket(code, "ana", [{**line, "price": "NaN"}], order_id="h"), ["body", "lines", 0, "price"]),
            (basket(code, "ana", [line] * 1001, order_id="h"), ["body", "lines"]),
            (basket(code, "ana", [], order_id="h"), ["body", "lines"]),
            (
                basket(code, "ana", [{**line, "quantity": "1000000", "price": "999999999"}] * 3, order_id="h"),
                ["body", "lines"],
            ),
            (basket(code, "ana", order_id="h", order_total="-1"), ["body", "order_total"]),
        ]
        for body, loc in cases:
            for path in ("/v1/coupons/validate", "/v1/coupons/redeem"):
                r = await st.offers.post(path, json=body)
                assert r.status_code == 422, (path, loc, r.text)
                locs = [e["loc"] for e in r.json()["error"]["details"]]
                assert any(x[: len(loc)] == loc for x in locs), (loc, locs)
        # Lone surrogates (JSON "\ud800" escapes) in any text the POS path sends to the database.
        for body, loc in (
            (basket(code, "ana\ud800", order_id="h"), ["body", "customer_id"]),
            (basket(code, "ana", order_id="\udfff"), ["body", "order_id"]),
            (basket(code, "ana", [{**line, "sku": "s\ud800"}], order_id="h"), ["body", "lines", 0, "sku"]),
            (basket(code, "ana", [{**line, "category": "\ud800"}], order_id="h"), ["body", "lines", 0, "category"]),
        ):
            for path in ("/v1/coupons/validate", "/v1/coupons/redeem"):
                r = await st.offers.post(
                    path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
                )
                assert r.status_code == 422, (path, loc, r.text)
                assert loc in [e["loc"] for e in r.json()["error"]["details"]], r.text
        r = await st.offers.post(
            f"/v1/coupons/{code}/rollback",
            content=json.dumps({"order_id": "\ud800"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 422 and ["body", "order_id"] in [e["loc"] for e in r.json()["error"]["details"]]
        for bad in ("WINE%00X", "%EF%BC%B7INE", "A" * 80):
            for r in (
                await st.offers.get(f"/v1/coupons/{bad}"),
                await st.offers.post(f"/v1/coupons/{bad}/rollback", json={"order_id": "h"}),
            ):
                assert r.status_code == 422, r.text
                assert ["path", "code"] in [e["loc"] for e in r.json()["error"]["details"]]
        assert (await st.sql("SELECT count(*) AS n FROM coupon_redemptions"))[0]["n"] == 0
        assert (await st.sql("SELECT uses FROM coupons")) == [{"uses": 0}]
