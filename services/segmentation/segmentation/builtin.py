"""Built-in segments installed with the service (once; edits made afterwards are kept)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from segmentation.repository.segments import SegmentRepository
from segmentation.segments import create_segment

BUILTIN_SEGMENTS: list[dict[str, Any]] = [
    {
        "key": "friday_wine_lovers",
        "name": "Friday wine lovers",
        "description": "Bought wine on at least 3 distinct Fridays in the last 8 weeks (scenario 1).",
        "rule": {
            "purchases": {
                "measure": "distinct_days",
                "category": "wine",
                "day_of_week": "friday",
                "within_days": 56,
            },
            "op": ">=",
            "value": 3,
        },
    },
    {
        "key": "lapsed_regulars",
        "name": "Lapsed regulars",
        "description": "At least 3 orders and none in the last 90 days (scenario 3).",
        "rule": {
            "all": [
                {"attr": "orders", "op": ">=", "value": 3},
                {"attr": "days_since_last_purchase", "op": ">", "value": 90},
            ]
        },
    },
    {
        "key": "purchase_due_7_14_days",
        "name": "Next purchase due in 7-14 days",
        "description": "Predicted next purchase 7 to 14 days from now (scenario 2).",
        "rule": {
            "all": [
                {"attr": "days_until_predicted_purchase", "op": ">=", "value": 7},
                {"attr": "days_until_predicted_purchase", "op": "<=", "value": 14},
            ]
        },
    },
    {
        "key": "lost_regulars",
        "name": "Lost regulars",
        "description": "Lapsed or lost after 3+ orders.",
        "rule": {"attr": "churn_kind", "op": "=", "value": "regular"},
    },
    {
        "key": "lost_new",
        "name": "Lost new customers",
        "description": "Lapsed or lost after their second order.",
        "rule": {"attr": "churn_kind", "op": "=", "value": "new"},
    },
    {
        "key": "one_off",
        "name": "One-off buyers",
        "description": "One order, more than 60 days ago.",
        "rule": {
            "all": [
                {"attr": "orders", "op": "=", "value": 1},
                {"attr": "days_since_last_purchase", "op": ">", "value": 60},
            ]
        },
    },
    {
        "key": "at_risk",
        "name": "At risk",
        "description": "Overdue against their own cadence.",
        "rule": {"attr": "lifecycle", "op": "=", "value": "at_risk"},
    },
    {
        "key": "frequent",
        "name": "Frequent buyers",
        "description": "At least 6 orders in the last 90 days.",
        "rule": {"purchases": {"measure": "orders", "within_days": 90}, "op": ">=", "value": 6},
    },
    {
        "key": "discount_lovers",
        "name": "Discount lovers",
        "description": "Half or more of their orders are discounted.",
        "rule": {"attr": "discount_affinity", "op": "=", "value": "discount_lover"},
    },
    {
        "key": "deal_hunters",
        "name": "Deal hunters",
        "description": "Buy almost only on a discount (80%+ of 3+ orders).",
        "rule": {"attr": "discount_affinity", "op": "=", "value": "deal_hunter"},
    },
    {
        "key": "core",
        "name": "Core customers",
        "description": "Top 20% by margin.",
        "rule": {"attr": "value_tier", "op": "=", "value": "core"},
    },
    {
        "key": "middle",
        "name": "Middle customers",
        "description": "Profitable, below the top 20% by margin.",
        "rule": {"attr": "value_tier", "op": "=", "value": "middle"},
    },
    {
        "key": "unprofitable",
        "name": "Unprofitable customers",
        "description": "Margin after discounts at most 2% of revenue.",
        "rule": {"attr": "value_tier", "op": "=", "value": "unprofitable"},
    },
]


async def install_builtin_segments(*, session: AsyncSession, now: datetime) -> list[str]:
    """Insert the built-in segments that are missing (by key); return the keys installed now."""
    repo = SegmentRepository(session)
    installed = []
    for seg in BUILTIN_SEGMENTS:
        if await repo.get(seg["key"]) is not None:
            continue
        await create_segment(
            session=session,
            key=seg["key"],
            name=seg["name"],
            description=seg["description"],
            rule=seg["rule"],
            now=now,
            builtin=True,
            segment_id=f"builtin:{seg['key']}",
        )
        installed.append(seg["key"])
    return installed
