"""Request and response models of the segmentation API."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SegmentKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
SegmentName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
Description = Annotated[str, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentCreate(_Strict):
    key: SegmentKey
    name: SegmentName
    description: Description | None = None
    rule: dict[str, Any] = Field(
        description="A rule node; see GET /v1/segments/attributes and the module docs of segmentation.rules"
    )


class SegmentUpdate(_Strict):
    name: SegmentName | None = None
    description: Description | None = None
    rule: dict[str, Any] | None = None


class DryRunRequest(_Strict):
    rule: dict[str, Any]
    sample: Annotated[int, Field(ge=0, le=100)] = 10


class DryRunResult(BaseModel):
    count: int
    sample: list[str]
    uses_time: bool
    uses_purchases: bool


class SegmentRead(BaseModel):
    id: str
    key: str
    name: str
    description: str | None
    rule: dict[str, Any]
    builtin: bool
    version: int
    size: int
    created_at: datetime
    updated_at: datetime


class MemberRead(BaseModel):
    customer_id: str
    entered_at: datetime


class MemberPage(BaseModel):
    items: list[MemberRead]
    next_cursor: str | None


class SizePoint(BaseModel):
    at: datetime
    size: int


class ProfileSegment(BaseModel):
    id: str
    key: str
    name: str
    entered_at: datetime


class ProfileRead(BaseModel):
    customer_id: str
    traits: dict[str, Any]
    consents: dict[str, Any]
    acquisition_channel: str | None
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    orders: int
    revenue: Decimal
    margin: Decimal
    avg_check: Decimal | None
    discount_share: float | None
    discounted_orders_share: float | None
    discount_affinity: str | None
    top_categories: list[str]
    favourite_category: str | None
    favourite_product: dict[str, Any] | None
    favourite_size: str | None
    favourite_color: str | None
    dow_counts: list[int] = Field(description="purchases per ISO weekday, Monday first")
    favourite_dow: int | None
    favourite_hour: int | None
    cadence_days: float | None
    predicted_next_purchase: datetime | None
    lifecycle: str
    churn_kind: str | None
    days_since_last_purchase: float | None
    rfm_r: int | None
    rfm_f: int | None
    rfm_m: int | None
    rfm_group: str | None
    value_tier: str | None
    engagement: dict[str, Any]
    last_feedback_rating: int | None
    last_feedback_topic: str | None
    last_feedback_at: datetime | None
    updated_at: datetime
    segments: list[ProfileSegment]
