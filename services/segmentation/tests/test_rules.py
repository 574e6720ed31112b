"""The rule language: pointed validation errors and the meaning of compiled rules on real profiles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from crm_common.db import session_scope
from segmentation.errors import InvalidRule
from segmentation.profiles import apply_events
from segmentation.rules import compile_rule
from segmentation.segments import dry_run

from .factories import event, item, purchase, records

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)  # a Friday


@pytest.mark.parametrize(
    ("rule", "path", "fragment"),
    [
        (
            {
                "all": [
                    {"attr": "orders", "op": ">=", "value": 3},
                    {"attr": "orderz", "op": ">", "value": 1},
                ]
            },
            "rule.all[1].attr",
            "unknown attribute 'orderz'",
        ),
        (
            {"any": [{"not": {"attr": "orders", "op": "gte", "value": 3}}]},
            "rule.any[0].not.op",
            "operator 'gte'",
        ),
        ({"attr": "orders", "op": ">=", "value": "3"}, "rule.value", "is a number"),
        ({"attr": "orders", "op": ">=", "value": True}, "rule.value", "is a number"),
        ({"attr": "orders", "op": ">=", "value": 1e300}, "rule.value", "finite number"),
        ({"attr": "lifecycle", "op": "=", "value": "sleeping"}, "rule.value", "expected one of"),
        ({"attr": "lifecycle", "op": "in", "value": []}, "rule.value", "non-empty list"),
        ({"attr": "traits.city", "op": "=", "value": "a\x00b"}, "rule.value", "without NUL"),
        ({"all": []}, "rule.all", "non-empty list"),
        (
            {
                "all": [
                    {
                        "purchases": {"category": "wine", "within_days": 56, "day_of_week": "fri"},
                        "op": ">=",
                        "value": 3,
                    },
                    {
                        "purchases": {
                            "category": "wine",
                            "day_of_week": "caturday",
                            "within_days": 56,
                        },
                        "op": ">=",
                        "value": 3,
                    },
                ]
            },
            "rule.all[1].purchases.day_of_week",
            "day name",
        ),
        (
            {"purchases": {"category": "wine"}, "op": ">=", "value": 3},
            "rule.purchases.within_days",
            "required",
        ),
        (
            {"purchases": {"measure": "visits", "within_days": 7}, "op": ">=", "value": 3},
            "rule.purchases.measure",
            "unknown measure",
        ),
        (
            {"purchases": {"within_days": 7, "colour": "red"}, "op": ">=", "value": 1},
            "rule.purchases",
            "unknown keys ['colour']",
        ),
        ({"attr": "orders", "op": "exists", "value": 1}, "rule.value", "takes no value"),
        ({"foo": 1}, "rule", "unknown node"),
        ([1, 2], "rule", "must be an object"),
    ],
)
def test_invalid_rule_is_refused_naming_the_bad_node(rule, path, fragment):
    with pytest.raises(InvalidRule) as exc:
        compile_rule(rule)
    err = exc.value
    assert err.status_code == 422
    assert err.details["errors"][0]["path"] == path
    assert fragment in err.details["errors"][0]["msg"]
    assert err.message.startswith(path)


def test_deeply_nested_rule_is_refused_not_crashed():
    rule: dict = {"attr": "orders", "op": ">", "value": 0}
    for _ in range(50):
        rule = {"not": rule}
    with pytest.raises(InvalidRule, match="nested too deeply"):
        compile_rule(rule)


def test_all_errors_are_listed():
    with pytest.raises(InvalidRule) as exc:
        compile_rule(
            {
                "all": [
                    {"attr": "x", "op": "=", "value": 1},
                    {"attr": "orders", "op": "~", "value": 1},
                ]
            }
        )
    assert [e["path"] for e in exc.value.details["errors"]] == [
        "rule.all[0].attr",
        "rule.all[1].op",
    ]


async def test_windowed_aggregate_counts_distinct_fridays_within_the_window(db):
    _, sm = db
    fridays = [NOW - timedelta(days=7 * k) for k in (0, 1, 3, 9)]  # the 9-week-old one is outside 56 days
    evs = [purchase("w1", at, [item("wine-a", "wine", "10.00")]) for at in fridays]
    evs.append(purchase("w1", fridays[0] + timedelta(hours=1), [item("wine-b", "Wine", "12.00")]))  # same Friday again
    evs += [
        purchase("w2", NOW - timedelta(days=7 * k + 1), [item("wine-a", "wine", "10.00")]) for k in range(4)
    ]  # Thursdays
    evs += [purchase("w3", NOW - timedelta(days=7 * k), [item("beer", "beer", "3.00")]) for k in range(4)]
    evs.append(event("customer_updated", "w4", NOW, {"first_name": "Nobody", "consents": {"email": True}}))
    async with session_scope(sm) as s:
        await apply_events(session=s, records=records(evs), now=NOW, decay_days=90)
    rule = {
        "purchases": {
            "measure": "distinct_days",
            "category": "wine",
            "day_of_week": "friday",
            "within_days": 56,
        },
        "op": ">=",
        "value": 3,
    }
    async with sm() as s:
        assert (await dry_run(session=s, rule=rule, now=NOW))["sample"] == ["w1"]
        # a week later the oldest Friday inside the window drops out
        assert (await dry_run(session=s, rule=rule, now=NOW + timedelta(days=35)))["count"] == 0
        both = {
            "any": [
                {"attr": "top_categories", "op": "contains", "value": "beer"},
                {"attr": "consents.email", "op": "=", "value": True},
            ]
        }
        assert (await dry_run(session=s, rule=both, now=NOW))["sample"] == ["w3", "w4"]
        negated = {"not": {"attr": "favourite_category", "op": "=", "value": "wine"}}
        assert (await dry_run(session=s, rule=negated, now=NOW))["sample"] == [
            "w3",
            "w4",
        ]  # null counts as "not wine"
        amount = {
            "purchases": {"measure": "amount", "sku": ["wine-a", "wine-b"], "within_days": 30},
            "op": ">",
            "value": 30,
        }
        assert (await dry_run(session=s, rule=amount, now=NOW))["sample"] == ["w1", "w2"]


async def test_set_based_and_per_customer_compilations_agree(db):
    from segmentation.repository.membership import MembershipRepository

    _, sm = db
    evs = []
    for c in range(12):
        for k in range(c % 5):
            evs.append(
                purchase(
                    f"a{c}",
                    NOW - timedelta(days=6 * k + c % 3),
                    [item(f"wine-{k % 2}", "wine" if c % 2 else "beer", "10.00", qty=1 + k % 2)],
                )
            )
    async with session_scope(sm) as s:
        await apply_events(session=s, records=records(evs), now=NOW, decay_days=90)
    rules = [
        {"purchases": {"measure": m, "category": "wine", "within_days": 20}, "op": op, "value": v}
        for m in ("orders", "distinct_days", "quantity", "amount")
        for op, v in ((">=", 2), ("<", 2), ("=", 0), ("!=", 1), (">", 0), ("<=", 3))
    ]
    rules.append(
        {
            "not": {
                "purchases": {"day_of_week": [1, 2, 3], "within_days": 30},
                "op": ">=",
                "value": 1,
            }
        }
    )
    async with sm() as s:
        repo = MembershipRepository(s)
        for rule in rules:
            one = compile_rule(rule)
            many = compile_rule(rule, set_based=True)
            assert one.sql != many.sql
            a = await repo.count_matching(rule_sql=one.sql, params=one.params, now=NOW, sample=100)
            b = await repo.count_matching(rule_sql=many.sql, params=many.params, now=NOW, sample=100)
            assert a == b, rule
