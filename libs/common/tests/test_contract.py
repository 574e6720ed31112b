"""The event contract's money rules: plain decimals, totals that match their items, real refunds."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from crm_common.contract.events import POSTED, PurchaseProps, RefundProps, validate_event
from crm_common.contract.types import PLAIN_DECIMAL_ERROR

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def purchase(items: list[dict[str, Any]], total: Any) -> dict[str, Any]:
    return {
        "event_id": "e-1",
        "type": "purchase",
        "customer_id": "c1",
        "occurred_at": NOW.isoformat(),
        "properties": {"order_id": "o-1", "items": items, "total": total, "currency": "EUR"},
    }


def line(unit_price: Any = "4.50", quantity: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"sku": "sku-1", "quantity": quantity, "unit_price": unit_price, **extra}


def errors(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(loc, msg) of every error; [] when the event is valid."""
    try:
        validate_event(body, source="pos", now=NOW)
    except ValidationError as exc:
        return [(tuple(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
    return []


def test_total_that_matches_its_items_and_discounts_is_accepted():
    items = [line("1.19", 2), line("2.49"), line("3.20", discount="0.30")]
    assert errors(purchase(items, "7.77")) == []


def test_total_off_by_more_than_a_cent_per_line_is_refused_naming_total_and_the_sum():
    items = [line("10.00"), line("19.50")]
    assert errors(purchase(items, "29.52")) == []  # within 2 lines x 0.01
    assert errors(purchase(items, "29.48")) == []
    assert errors(purchase(items, "30.00")) == [
        (("total",), "total 30.00 does not match the items (sum 29.50 ± 0.02, 0.01 per line)")
    ]
    assert errors(purchase([line("29.50")], "29.49")) == []
    assert errors(purchase([line("29.50")], "29.48")) == [
        (("total",), "total 29.48 does not match the items (sum 29.50 ± 0.01)")
    ]


def test_discount_is_for_the_whole_line_not_per_unit():
    # 3 × 2.00 less 1.50 for the line is 4.50 (per unit it would be 1.50).
    assert errors(purchase([line("2.00", 3, discount="1.50")], "4.50")) == []
    assert errors(purchase([line("2.00", 3, discount="1.50")], "1.50"))[0][0] == ("total",)


def test_discount_above_the_line_price_is_refused_on_the_discount():
    assert errors(purchase([line("2.00", 3, discount="6.00")], "0")) == []
    assert errors(purchase([line("2.00", 3, discount="6.01")], "0")) == [
        (("items", 0, "discount"), "discount 6.01 is more than the line's price 6.00 (quantity × unit_price)")
    ]


def test_refund_of_zero_is_refused_on_amount():
    def refund(amount: Any) -> dict[str, Any]:
        return {
            "event_id": "r-1",
            "type": "refund",
            "customer_id": "c1",
            "occurred_at": NOW.isoformat(),
            "properties": {"order_id": "o-1", "amount": amount},
        }

    for zero in ("0", "0.00", 0):
        assert errors(refund(zero)) == [(("amount",), "must be greater than 0: a refund of nothing changes nothing")]
    assert errors(refund("0.01")) == []


@pytest.mark.parametrize(
    "amount",
    ["1_000", " 10 ", "10 ", "1e3", "1E3", "NaN", "nan", "Infinity", "-Infinity", "+5", ".5", "5.", "٣", "1,5", ""],
)
def test_money_strings_that_are_not_plain_decimals_are_refused(amount):
    got = errors(purchase([line(amount)], "4.50"))
    assert got == [(("items", 0, "unit_price"), PLAIN_DECIMAL_ERROR)]


@pytest.mark.parametrize("field", ["total", "points_redeemed"])
def test_other_amounts_take_plain_decimals_only_too(field):
    body = purchase([line()], "4.50")
    body["properties"][field] = "4.5e0"
    assert errors(body) == [((field,), PLAIN_DECIMAL_ERROR)]


def test_json_numbers_are_still_taken_as_the_decimal_they_print_as():
    # The contract has taken JSON numbers from the start; they stay valid in v1.
    props = validate_event(purchase([line(4.5, 2, discount=0.1)], 8.9), source="pos", now=NOW).properties
    assert props["total"] == "8.9" and props["items"][0]["unit_price"] == "4.5"
    assert props["items"][0]["discount"] == "0.1"
    assert errors(purchase([line(True)], "4.50"))[0][0] == ("items", 0, "unit_price")


def test_archived_events_are_read_back_without_the_posted_only_rules():
    # A purchase archived before these rules must still load downstream (and on replay).
    stored = {"order_id": "o", "items": [line("4.50", discount="9")], "total": "1", "currency": "EUR"}
    assert PurchaseProps.model_validate(stored).total == Decimal("1")
    assert RefundProps.model_validate({"order_id": "o", "amount": "0"}).amount == 0
    with pytest.raises(ValidationError):
        PurchaseProps.model_validate(stored, context=POSTED)
    # The format of a decimal is checked everywhere: only the posted-only rules are relaxed.
    with pytest.raises(ValidationError):
        PurchaseProps.model_validate({**stored, "total": "1_000"})
