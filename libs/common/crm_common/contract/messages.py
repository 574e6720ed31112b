"""Internal topic messages: segments, loyalty, message requests, deliveries, DLQ.

Every message has a stable `id` (consumers dedupe by it) and is keyed by `customer_id`.
Event names are past tense; commands (message requests) are imperative.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    customer_id: str
    occurred_at: datetime


class ProfileDigest(BaseModel):
    """What offers and notifier need to personalise without calling segmentation."""

    model_config = ConfigDict(extra="allow")
    first_name: str | None = None
    favourite_product: dict[str, Any] | None = None  # {"sku", "name", "category", "size", "color"}
    favourite_category: str | None = None
    favourite_size: str | None = None
    predicted_next_purchase: datetime | None = None
    value_tier: Literal["core", "middle", "unprofitable"] | None = None
    lifecycle: str | None = None
    orders: int | None = None
    revenue: Decimal | None = None


class SegmentMembershipChanged(_Msg):
    """`crm.segments.v1`: a customer entered or exited a segment."""

    type: Literal["segment.entered", "segment.exited"]
    segment_id: str
    segment_key: str
    profile: ProfileDigest = Field(default_factory=ProfileDigest)


LoyaltyEventType = Literal[
    "points.accrued",
    "points.redeemed",
    "points.reversed",
    "points.expired",
    "points.adjusted",
    "points.expiring",
    "tier.changed",
    "goal.assigned",
    "goal.completed",
    "goal.expired",
    "referral.rewarded",
    "redemption.cancelled",
]


class LoyaltyEvent(_Msg):
    """`crm.loyalty.v1`: something happened to a loyalty account."""

    type: LoyaltyEventType
    points: Decimal | None = None
    balance: Decimal | None = None
    data: dict[str, Any] = Field(default_factory=dict)


MessageKind = Literal["marketing", "transactional"]
Channel = Literal["email", "sms", "push"]


class MessageRequested(_Msg):
    """`crm.messages.v1`: send one message to one customer (a command, from offers or loyalty)."""

    type: Literal["message.requested"] = "message.requested"
    kind: MessageKind = "marketing"
    template: str  # template key, e.g. "points_expiring"
    channel: Channel | None = None  # None: chosen by policy (preference, then cheapest consented)
    locale: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    campaign_id: str | None = None
    offer_id: str | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    source_service: str = "unknown"


DeliveryStatus = Literal["sent", "delivered", "failed", "suppressed", "expired", "opened", "clicked", "unsubscribed"]


class DeliveryEvent(_Msg):
    """`crm.deliveries.v1`: what happened to a message (from the notifier)."""

    type: Literal["delivery.updated"] = "delivery.updated"
    message_id: str
    status: DeliveryStatus
    channel: Channel | None = None
    campaign_id: str | None = None
    offer_id: str | None = None
    reason: str | None = None
    cost: Decimal | None = None
    url: str | None = None


class DeadLetter(BaseModel):
    """`crm.dlq.v1`: a message a consumer could not apply, with the error and its origin."""

    model_config = ConfigDict(extra="allow")
    id: str
    consumer: str
    source_topic: str
    partition: int
    offset: int
    message_id: str | None = None
    error: str
    failed_at: datetime
