"""Every crm.segments.v1 row in the outbox is a SegmentMembershipChanged, from both paths that write one:
the consumer (per batch, for the customers it touched) and the set-based pass (sweeps, segment edits)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from crm_common.db import session_scope
from crm_common.outbox import TOPIC_MODELS
from crm_common.settings import TOPIC_SEGMENTS
from segmentation.profiles import apply_events
from segmentation.segments import create_segment, delete_segment, recompute_all

from .conftest import fetch_all
from .factories import event, item, purchase, records

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)


async def outbox_messages(sm) -> list[Any]:
    """The outbox rows, each validated against its topic's contract model (and emptied)."""
    rows = await fetch_all(sm, "SELECT topic, key, value FROM outbox ORDER BY id")
    async with session_scope(sm) as s:
        await s.execute(text("DELETE FROM outbox"))
    out = []
    for row in rows:
        message = TOPIC_MODELS[row["topic"]].model_validate_json(bytes(row["value"]))
        assert row["topic"] == TOPIC_SEGMENTS
        assert row["key"] == message.customer_id
        out.append(message)
    return out


async def logged(sm) -> dict[tuple[str, str, str], int]:
    rows = await fetch_all(sm, "SELECT id, segment_id, customer_id, change FROM membership_log")
    return {(r["segment_id"], r["customer_id"], r["change"]): r["id"] for r in rows}


async def apply(sm, events, now=NOW) -> None:
    async with session_scope(sm) as s:
        await apply_events(session=s, records=records(events), now=now, decay_days=90)


async def segment(sm, key: str, rule: dict[str, Any], now=NOW) -> str:
    async with session_scope(sm) as s:
        return (await create_segment(session=s, key=key, name=key, description=None, rule=rule, now=now))["id"]


async def test_consumer_publishes_entered_and_exited_as_segment_membership_changed(db):
    _, sm = db
    one_off = await segment(sm, "one_order", {"attr": "orders", "op": "=", "value": 1})
    assert await outbox_messages(sm) == []  # nobody to fill it with yet

    await apply(
        sm,
        [
            event(
                "customer_updated", "ann", NOW - timedelta(days=3), {"first_name": "Ann", "consents": {"email": True}}
            ),
            purchase("ann", NOW - timedelta(days=2), [item("brie", "cheese", "7.50", qty=2)]),
        ],
    )
    [entered] = await outbox_messages(sm)
    log = await logged(sm)
    assert entered.id == f"segchg:{log[(one_off, 'ann', 'entered')]}"
    assert (entered.type, entered.customer_id) == ("segment.entered", "ann")
    assert (entered.segment_id, entered.segment_key) == (one_off, "one_order")
    assert entered.occurred_at == NOW
    digest = entered.profile
    assert digest.first_name == "Ann"
    assert (digest.orders, digest.revenue, digest.lifecycle) == (1, Decimal("15.0000"), "new")
    assert digest.favourite_category == "cheese"
    assert digest.favourite_product == {"sku": "brie", "name": "Brie", "category": "cheese"}
    assert digest.model_extra is not None and digest.model_extra["consents"] == {"email": True}

    # A second order takes her out of "exactly one order"; the exit carries the new digest.
    await apply(sm, [purchase("ann", NOW - timedelta(days=1), [item("wine-1", "wine", "20.00")])])
    [exited] = await outbox_messages(sm)
    assert exited.id == f"segchg:{(await logged(sm))[(one_off, 'ann', 'exited')]}"
    assert (exited.type, exited.customer_id, exited.segment_key) == ("segment.exited", "ann", "one_order")
    assert (exited.profile.orders, exited.profile.revenue) == (2, Decimal("35.0000"))


async def test_recompute_publishes_entered_and_exited_as_segment_membership_changed(db):
    _, sm = db
    await apply(
        sm,
        [
            event("customer_updated", "bo", NOW - timedelta(days=40), {"first_name": "Bo"}),
            purchase("bo", NOW - timedelta(days=5), [item("lager", "beer", "3.00", qty=4)]),
            purchase("cy", NOW - timedelta(days=6), [item("stout", "beer", "4.00")]),
        ],
    )
    # Filled at creation by the set-based pass.
    recent = await segment(sm, "recent", {"attr": "days_since_last_purchase", "op": "<", "value": 10})
    created = await outbox_messages(sm)
    assert sorted((m.type, m.customer_id, m.segment_key) for m in created) == [
        ("segment.entered", "bo", "recent"),
        ("segment.entered", "cy", "recent"),
    ]
    bo = next(m for m in created if m.customer_id == "bo")
    assert bo.profile.first_name == "Bo" and bo.profile.orders == 1 and bo.profile.revenue == Decimal("12.0000")

    quiet = await segment(sm, "quiet", {"attr": "days_since_last_purchase", "op": ">=", "value": 10})
    assert await outbox_messages(sm) == []

    # Ten days on, only the clock changed: the sweep moves both from "recent" to "quiet".
    later = NOW + timedelta(days=10)
    async with session_scope(sm) as s:
        result = await recompute_all(session=s, now=later)
    assert result["segments"] == {"quiet": {"entered": 2, "exited": 0}, "recent": {"entered": 0, "exited": 2}}
    swept = await outbox_messages(sm)
    log = await logged(sm)
    assert sorted((m.type, m.customer_id, m.segment_key, m.segment_id, m.id) for m in swept) == [
        ("segment.entered", "bo", "quiet", quiet, f"segchg:{log[(quiet, 'bo', 'entered')]}"),
        ("segment.entered", "cy", "quiet", quiet, f"segchg:{log[(quiet, 'cy', 'entered')]}"),
        ("segment.exited", "bo", "recent", recent, f"segchg:{log[(recent, 'bo', 'exited')]}"),
        ("segment.exited", "cy", "recent", recent, f"segchg:{log[(recent, 'cy', 'exited')]}"),
    ]
    assert all(m.occurred_at == later for m in swept)
    assert {m.profile.lifecycle for m in swept if m.customer_id == "bo"} == {"new"}

    # Deleting a segment publishes an exit for each member.
    async with session_scope(sm) as s:
        assert await delete_segment(session=s, id_or_key="quiet", now=later) == 2
    deleted = await outbox_messages(sm)
    assert sorted((m.type, m.customer_id, m.segment_key) for m in deleted) == [
        ("segment.exited", "bo", "quiet"),
        ("segment.exited", "cy", "quiet"),
    ]


async def test_a_sweep_counts_only_its_own_changes(db):
    _, sm = db
    await apply(sm, [purchase("dee", NOW - timedelta(days=1), [item("brie", "cheese", "5.00")])])
    await segment(sm, "buyers", {"attr": "orders", "op": ">=", "value": 1})
    async with session_scope(sm) as s:
        result = await recompute_all(session=s, now=NOW)
    # The entry made when the segment was created is in the log, not in this pass.
    assert result["segments"] == {"buyers": {"entered": 0, "exited": 0}}
    assert len(await logged(sm)) == 1
