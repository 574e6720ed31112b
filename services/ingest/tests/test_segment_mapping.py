"""The Segment-to-contract mapping on its own: money, totals, timestamps, traits, names, error fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crm_common.contract.events import validate_event
from ingest.segment import amount, map_message, parse_time, segment_field

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

# The Order Completed example of Segment's e-commerce spec v2.
SPEC_ORDER = {
    "order_id": "50314b8e9bcf000000000000",
    "total": 27.50,
    "subtotal": 22.50,
    "revenue": 25.00,
    "shipping": 3,
    "tax": 2,
    "discount": 2.5,
    "coupon": "hasbros",
    "currency": "USD",
    "products": [
        {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "45790-32",
            "name": "Monopoly: 3rd Edition",
            "price": 19,
            "quantity": 1,
            "category": "Games",
        },
        {
            "product_id": "505bd76785ebb509fc183733",
            "sku": "46493-32",
            "name": "Uno Card Game",
            "price": 3,
            "quantity": 2,
            "category": "Games",
        },
    ],
}


def track(event: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": event, "userId": "c1", "messageId": "m1", "properties": properties, **extra}


def mapped(message: dict[str, Any], *, call: str | None = None, sent_at: Any = None, context: Any = None):
    return map_message(message, call=call, batch_sent_at=sent_at, batch_context=context, now=NOW)


def event_of(message: dict[str, Any], **kw: Any) -> dict[str, Any]:
    result = mapped(message, **kw)
    assert result.reasons == [] and result.event is not None
    return result.event


def line_net(item: dict[str, Any]) -> Decimal:
    return Decimal(item["unit_price"]) * Decimal(item.get("quantity", 1)) - Decimal(item.get("discount", 0))


def test_spec_order_completed_becomes_a_purchase_whose_total_is_its_lines_after_discount():
    event = event_of(track("Order Completed", SPEC_ORDER))
    props = validate_event(event, source="site", now=NOW).properties
    assert event["type"] == "purchase"
    # total 27.50 less shipping 3 and tax 2: the items after the order's 2.50 discount.
    assert props["total"] == "22.50"
    assert [i["discount"] for i in props["items"]] == ["1.90", "0.60"]
    assert sum(line_net(i) for i in props["items"]) == Decimal(props["total"])
    assert (props["coupon_code"], props["currency"], props["order_id"]) == ("hasbros", "USD", SPEC_ORDER["order_id"])
    assert [i["sku"] for i in props["items"]] == ["45790-32", "46493-32"]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (("subtotal", "discount"), "22.50"),
        (("revenue", "discount"), "22.50"),
        (("discount",), "22.50"),  # no total of any kind: the items' own sum
        ((), "25.00"),
    ],
)
def test_the_total_falls_back_from_total_to_subtotal_to_revenue_to_the_items(keep, expected):
    props = {k: v for k, v in SPEC_ORDER.items() if k in ("order_id", "currency", "products", *keep)}
    event = event_of(track("Order Completed", props))
    assert event["properties"]["total"] == expected
    checked = validate_event(event, source="site", now=NOW).properties
    assert sum(line_net(i) for i in checked["items"]) == Decimal(checked["total"])


def test_a_spread_discount_adds_up_to_the_discount_to_the_cent():
    products = [{"sku": f"s{i}", "price": 1, "quantity": 1} for i in range(3)]
    event = event_of(
        track("Order Completed", {"order_id": "o", "currency": "EUR", "discount": 1, "products": products})
    )
    discounts = [Decimal(i["discount"]) for i in event["properties"]["items"]]
    assert sum(discounts) == Decimal("1.00") and sorted(discounts) == [
        Decimal("0.33"),
        Decimal("0.33"),
        Decimal("0.34"),
    ]
    assert event["properties"]["total"] == "2.00"


def test_float_amounts_become_plain_decimal_strings_with_cents():
    reasons: list[dict[str, Any]] = []
    assert amount(0.1 + 0.2, "p", reasons) == "0.30"
    assert amount(19.99, "p", reasons) == "19.99"
    assert amount(4.5, "p", reasons) == "4.50"
    assert amount(7, "p", reasons) == "7.00"
    assert amount(1.2345, "p", reasons) == "1.2345"
    assert amount(1e16, "p", reasons) == "10000000000000000.00"  # plain, for the contract to refuse by range
    assert amount("4.5", "p", reasons) == "4.5"  # a string is the contract's to judge, as in /v1/events
    assert reasons == []
    for bad in (float("nan"), float("inf"), True):
        assert amount(bad, "properties.price", reasons) is None
    assert [r["field"] for r in reasons] == ["properties.price"] * 3


def test_a_nan_price_is_a_reason_naming_the_product():
    result = mapped(track("Product Viewed", {"sku": "s", "category": "c", "price": float("nan")}))
    assert result.event is None and result.reasons == [{"field": "properties.price", "msg": "must be a finite number"}]


def test_sent_at_corrects_the_senders_clock_skew():
    # The sender's clock is an hour fast: it stamped 13:00 and sent at 13:00:05, we receive at 12:00.
    message = {**track("E", {}), "timestamp": "2026-01-05T13:00:00Z", "sentAt": "2026-01-05T13:00:05Z"}
    assert event_of(message)["occurred_at"] == NOW - timedelta(seconds=5)
    # originalTimestamp wins over timestamp; a batch's sentAt applies to its messages.
    message = {**track("E", {}), "originalTimestamp": "2026-01-05T12:59:00+01:00", "timestamp": "2000-01-01T00:00:00Z"}
    when = event_of(message, sent_at="2026-01-05T13:00:00+01:00")["occurred_at"]
    assert when == NOW - timedelta(minutes=1)


def test_timestamps_without_sent_at_offset_or_at_all():
    ten = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assert event_of({**track("E", {}), "timestamp": "2026-01-05T10:00:00Z"})["occurred_at"] == ten
    assert event_of({**track("E", {}), "timestamp": "2026-01-05T10:00:00"})["occurred_at"] == ten
    assert event_of(track("E", {}))["occurred_at"] == NOW
    assert parse_time("2015-2-02T00:30:08.276Z") == datetime(2015, 2, 2, 0, 30, 8, 276000, tzinfo=UTC)
    result = mapped({**track("E", {}), "timestamp": 1736078400})
    assert result.event is None and result.reasons[0]["field"] == "timestamp"


def test_identify_maps_traits_and_context():
    message = {
        "type": "identify",
        "userId": 42,
        "anonymousId": "a-1",
        "messageId": "i-1",
        "traits": {
            "email": "x@example.com",
            "first_name": "Jo",
            "lastName": "Doe",
            "phone": "+14155550123",
            "birthday": "1990-05-17T00:00:00.000Z",
            "address": {"city": "Porto", "country": "PT"},
            "timezone": "Europe/Lisbon",
            "consents": {"email": True, "sms": False},
            "plan": "gold",
        },
        "context": {"timezone": "America/New_York", "locale": "pt-PT"},
    }
    event = event_of(message)
    assert (event["customer_id"], event["anonymous_id"], event["type"]) == ("42", "a-1", "customer_updated")
    assert event["properties"] == {
        "email": "x@example.com",
        "phone": "+14155550123",
        "first_name": "Jo",
        "last_name": "Doe",
        "consents": {"email": True, "sms": False},
        "birth_date": "1990-05-17",
        "city": "Porto",
        "timezone": "Europe/Lisbon",  # the trait wins over the context
        "locale": "pt-PT",
    }
    validate_event(event, source="app", now=NOW)
    cleared = event_of({"type": "identify", "userId": "c", "messageId": "i-2", "traits": {"phone": None}})
    assert cleared["properties"] == {"phone": None}


def test_batch_context_is_merged_under_the_messages_own():
    message = {"type": "page", "anonymousId": "a", "messageId": "p", "context": {"campaign": {"source": "mine"}}}
    event = event_of(message, context={"campaign": {"source": "batch", "name": "x"}, "page": {"url": "/home"}})
    assert event["properties"] == {"page": "/home", "utm_source": "mine"}


def test_product_removed_without_the_cart_is_a_custom_event():
    removed = event_of(track("Product Removed", {"sku": "s", "price": 3}))
    assert removed["type"] == "custom" and removed["properties"]["name"] == "Product Removed"
    cart = event_of(track("Product Removed", {"products": [{"sku": "s2", "price": 1.5, "quantity": 2}]}))
    assert cart["type"] == "cart_updated" and cart["properties"]["total"] == "3.00"
    viewed = event_of(track("Cart Viewed", {"products": []}))
    assert viewed["properties"] == {"items": [], "total": "0.00"}


def test_custom_keeps_its_properties_and_moves_a_name_property_aside():
    event = event_of(track("Video Played", {"name": "Intro", "seconds": 12}))
    assert event["properties"] == {"property_name": "Intro", "seconds": 12, "name": "Video Played"}


def test_other_calls():
    alias = event_of({"type": "alias", "previousId": "anon-9", "userId": "c9", "messageId": "a"})
    assert (alias["customer_id"], alias["anonymous_id"], alias["properties"]) == ("c9", "anon-9", {})
    assert mapped({"type": "alias", "userId": "c9", "messageId": "a"}).reasons[0]["field"] == "previousId"
    screen = event_of({"userId": "c", "messageId": "s", "name": "Checkout"}, call="screen")
    assert (screen["type"], screen["properties"]) == ("site_visit", {"page": "Checkout"})
    group = event_of({"type": "group", "userId": "c", "groupId": 7, "messageId": "g", "traits": {"plan": "x"}})
    assert group["properties"] == {"name": "group", "group_id": "7", "traits": {"plan": "x"}}
    unknown = mapped({"type": "teleport", "messageId": "t"})
    assert unknown.event is None and unknown.reasons[0]["field"] == "type"


def test_a_message_without_message_id_gets_a_stable_digest():
    message = {"type": "track", "userId": "c", "event": "E", "timestamp": "2026-01-05T11:00:00Z"}
    first, again = event_of(dict(message))["event_id"], event_of(dict(reversed(message.items())))["event_id"]
    assert first == again and first.startswith("sha256-") and len(first) <= 128
    assert event_of({**message, "event": "F"})["event_id"] != first


def test_contract_errors_are_named_by_their_segment_fields():
    result = mapped(
        track("Order Completed", {"order_id": "o", "currency": "EUR", "total": 1, "products": [{"price": 1}]})
    )
    assert result.event is not None
    with pytest.raises(ValidationError):
        validate_event(result.event, source="site", now=NOW)
    assert segment_field(["properties", "items", 0, "sku"], result.origins) == "properties.products[0].sku"
    assert segment_field(["properties", "items", 0, "unit_price"], result.origins) == "properties.products[0].price"
    assert segment_field(["properties", "coupon_code"], result.origins) == "properties.coupon"
    assert segment_field(["customer_id"], result.origins) == "userId"
    assert segment_field(["occurred_at"], result.origins) == "timestamp"
    added = mapped(track("Product Added", {"sku": "s"}))
    assert segment_field(["properties", "items", 0, "unit_price"], added.origins) == "properties.price"
    identify = mapped({"type": "identify", "userId": "c", "messageId": "i", "context": {"locale": "??"}})
    assert segment_field(["properties", "locale"], identify.origins) == "context.locale"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
_keys = st.sampled_from(
    [
        "type",
        "event",
        "userId",
        "anonymousId",
        "previousId",
        "messageId",
        "timestamp",
        "sentAt",
        "originalTimestamp",
        "properties",
        "traits",
        "context",
        "name",
        "groupId",
        "products",
        "total",
        "price",
        "order_id",
        "discount",
    ]
)
_event_names = st.sampled_from(
    ["Order Completed", "Order Refunded", "Product Viewed", "Product Added", "Cart Viewed", "Product Removed", "x"]
)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    base=st.dictionaries(_keys, _json, max_size=8),
    props=st.dictionaries(_keys, _json, max_size=6),
    products=st.lists(st.dictionaries(_keys, _json, max_size=5), max_size=3),
    name=_event_names,
    call=st.sampled_from([None, "track", "identify", "page", "screen", "alias", "group"]),
)
def test_any_json_maps_without_raising_and_validates_or_names_its_errors(base, props, products, name, call):
    message = {**base, "event": name, "properties": {**props, "products": products}, "traits": props}
    result = map_message(message, call=call, batch_sent_at=None, batch_context=None, now=NOW)
    assert (result.event is None) == bool(result.reasons)
    if result.event is not None:
        try:
            validate_event(result.event, source="site", now=NOW)
        except ValidationError as exc:
            for error in exc.errors():
                assert isinstance(segment_field(list(error["loc"]), result.origins), str)
