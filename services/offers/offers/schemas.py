"""Campaign definitions and the API's request and response models."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from crm_common.contract.events import EventType
from crm_common.contract.types import Id, Money, Name, ShortText

# A field named `date` shadows the type inside its class.
CalendarDate = date

SegmentKey = Annotated[str, Field(min_length=1, max_length=128)]
TemplateKey = Annotated[str, Field(min_length=1, max_length=128)]
Tier = Literal["core", "middle", "unprofitable"]
Channel = Literal["email", "sms", "push"]
Scalar = str | int | float | bool
Outcome = Literal[
    "requested",
    "control",
    "global_control",
    "not_in_audience",
    "economics_guard",
    "cooldown",
    "once_per_customer",
    "lower_priority",
    "budget_exhausted",
    "outside_window",
    "already_bought",
    "waiting",
]
OUTCOMES: tuple[str, ...] = Outcome.__args__  # type: ignore[attr-defined]
DIGEST_FIELDS = (
    "first_name",
    "favourite_category",
    "favourite_size",
    "favourite_color",
    "value_tier",
    "lifecycle",
    "orders",
    "revenue",
    "avg_check",
    "discount_affinity",
    "last_feedback_rating",
    "last_feedback_topic",
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(Strict):
    """One test on the customer's profile digest, e.g. last_feedback_topic = quality."""

    field: Literal[DIGEST_FIELDS]  # type: ignore[valid-type]
    op: Literal["=", "!=", "<", "<=", ">", ">=", "in", "not_in", "exists", "not_exists"]
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op in ("<", "<=", ">", ">=") and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float)
        ):
            raise ValueError(f"op {self.op!r} needs a number")
        if self.op in ("=", "!=") and (self.value is None or isinstance(self.value, list)):
            raise ValueError(f"op {self.op!r} needs a single value")
        return self


class Audience(Strict):
    """Everyone when `include_segments` is empty; exclusions, tiers and conditions narrow it."""

    include_segments: Annotated[list[SegmentKey], Field(max_length=50)] = Field(
        default_factory=list, description="members of any of these segments (empty: everyone)"
    )
    exclude_segments: Annotated[list[SegmentKey], Field(max_length=50)] = Field(default_factory=list)
    tiers: Annotated[list[Tier], Field(max_length=3)] = Field(
        default_factory=list, description="value tiers to target (empty: all)"
    )
    conditions: Annotated[list[Condition], Field(max_length=20)] = Field(default_factory=list)


PropertyFilter = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Scalar | list[Scalar]], Field(max_length=20)
]


class SegmentEntered(Strict):
    kind: Literal["segment_entered"]
    segment_key: SegmentKey


class EventTrigger(Strict):
    """An event of a type (a custom event by name) whose properties match the filter."""

    kind: Literal["event"]
    event_type: EventType
    name: Name | None = Field(None, description="the custom event's name (type custom)")
    properties: PropertyFilter = Field(default_factory=dict, description="property = value, or in a list")

    @model_validator(mode="after")
    def _custom_needs_name(self) -> EventTrigger:
        if self.event_type == "custom" and not self.name:
            raise ValueError("a custom event trigger needs its name")
        return self


class NoPurchaseAfter(EventTrigger):
    """The event, then no purchase within `wait_hours` (browse or cart abandonment): a durable timer."""

    kind: Literal["no_purchase_after"]  # type: ignore[assignment]
    wait_hours: Annotated[float, Field(gt=0, le=24 * 60)] = 24

    @field_validator("event_type")
    @classmethod
    def _not_purchase(cls, v: str) -> str:
        if v == "purchase":
            raise ValueError("a purchase cannot be followed by no purchase: the timer would be cancelled at once")
        return v


class Inactivity(Strict):
    kind: Literal["inactivity"]
    days: Annotated[int, Field(ge=1, le=3650)]


class PurchaseWindow(Strict):
    """Between `max_days` and `min_days` before the predicted next purchase, once per purchase cycle."""

    kind: Literal["purchase_window"]
    min_days: Annotated[int, Field(ge=0, le=365)] = 7
    max_days: Annotated[int, Field(ge=0, le=365)] = 14

    @model_validator(mode="after")
    def _window(self) -> PurchaseWindow:
        if self.min_days > self.max_days:
            raise ValueError(
                f"min_days ({self.min_days}) is after max_days ({self.max_days}): the window can never be met"
            )
        return self


class Schedule(Strict):
    """A broadcast at `local_time` on `date` in each customer's own time zone; `every_days` repeats it."""

    kind: Literal["schedule"]
    date: CalendarDate
    local_time: time = time(10, 0)
    every_days: Annotated[int, Field(ge=1, le=366)] | None = None
    until: CalendarDate | None = None

    @model_validator(mode="after")
    def _until(self) -> Schedule:
        if self.until is not None and self.until < self.date:
            raise ValueError("until is before date: the schedule would never run")
        return self


class Birthday(Strict):
    kind: Literal["birthday"]
    days_before: Annotated[int, Field(ge=0, le=60)] = 0
    local_time: time = time(10, 0)


Trigger = Annotated[
    SegmentEntered | EventTrigger | NoPurchaseAfter | Inactivity | PurchaseWindow | Schedule | Birthday,
    Field(discriminator="kind"),
]
TIME_TRIGGERS = ("inactivity", "purchase_window", "schedule", "birthday")


class Offer(Strict):
    kind: Literal["percent", "fixed", "free_delivery", "points_multiplier", "info"]
    value: Decimal | None = Field(None, description="percent (0-100] or a fixed amount")
    multiplier: Annotated[Decimal, Field(gt=1, le=10)] | None = None
    target: Literal["favourite_product", "favourite_category", "skus", "basket"] = "basket"
    skus: Annotated[list[Id], Field(max_length=100)] = Field(default_factory=list)
    category: ShortText | None = Field(
        None, description="with target favourite_product: their most bought product in this category"
    )
    min_basket: Money | None = None
    min_quantity: Annotated[int, Field(ge=1, le=1000)] | None = None
    validity_days: Annotated[int, Field(ge=1, le=365)] = 14
    coupon: bool = Field(True, description="issue a personal single-use coupon code")

    @model_validator(mode="after")
    def _consistent(self) -> Offer:
        if self.kind == "percent" and (self.value is None or not (0 < self.value <= 100)):
            raise ValueError("a percent offer needs value in (0, 100]")
        if self.kind == "fixed" and (self.value is None or not (0 < self.value <= Decimal(1_000_000))):
            raise ValueError("a fixed offer needs a positive value")
        if self.kind == "points_multiplier" and self.multiplier is None:
            raise ValueError("a points_multiplier offer needs multiplier")
        if self.target == "skus" and not self.skus:
            raise ValueError("target skus needs a non-empty skus list")
        return self

    @property
    def is_discount(self) -> bool:
        return self.kind in ("percent", "fixed", "free_delivery")


class Delivery(Strict):
    template: TemplateKey = Field(description="the notifier's template key (one per channel there)")
    channel: Channel | None = Field(None, description="forced channel; none: the notifier's cost-aware choice")
    locale: Annotated[str, Field(max_length=35)] | None = None


class Limits(Strict):
    once_per_customer: bool = False
    cooldown_days: Annotated[float, Field(gt=0, le=3650)] | None = None
    priority: Annotated[int, Field(ge=0, le=1000)] = 0
    collision_minutes: Annotated[float, Field(ge=0, le=10_080)] | None = None
    budget_messages: Annotated[int, Field(ge=1)] | None = None
    budget_cost: Annotated[Decimal, Field(gt=0, le=Decimal(10) ** 12)] | None = None
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _period(self) -> Limits:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at is not after starts_at: the campaign could never run")
        return self


class Economics(Strict):
    guard_tiers: Annotated[list[Tier], Field(max_length=3)] = Field(
        default_factory=lambda: list[Tier](["unprofitable"]), description="discount offers skip these tiers"
    )
    min_expected_margin: Annotated[Decimal, Field(ge=-(Decimal(10) ** 9), le=Decimal(10) ** 9)] | None = Field(
        None, description="skip customers whose expected margin per order minus the discount is below this"
    )
    expected_redemption_rate: Annotated[float, Field(ge=0, le=1)] | None = None


class CampaignDefinition(Strict):
    """Everything a campaign version is: who, when, what, how, how often, and against what control."""

    name: ShortText = Field(min_length=1)
    description: Annotated[str, Field(max_length=2000)] | None = None
    audience: Audience = Field(default_factory=Audience)
    trigger: Trigger
    offer: Offer = Field(default_factory=lambda: Offer(kind="info"))
    delivery: Delivery
    limits: Limits = Field(default_factory=Limits)
    control_share: Annotated[float, Field(ge=0, le=0.5)] | None = Field(
        None, description="share of the audience held out (0-0.5; default the service's setting)"
    )
    economics: Economics = Field(default_factory=Economics)
    attribution_days: Annotated[int, Field(ge=1, le=90)] = Field(
        7, description="days after each assignment (treated or held out) whose purchases count for the campaign"
    )


class CampaignUpdate(Strict):
    """Sections to replace; absent ones are kept. An edit of an active campaign makes a new version."""

    name: ShortText | None = Field(None, min_length=1)
    description: Annotated[str, Field(max_length=2000)] | None = None
    audience: Audience | None = None
    trigger: Trigger | None = None
    offer: Offer | None = None
    delivery: Delivery | None = None
    limits: Limits | None = None
    control_share: Annotated[float, Field(ge=0, le=0.5)] | None = None
    economics: Economics | None = None
    attribution_days: Annotated[int, Field(ge=1, le=90)] | None = None


class CampaignRead(BaseModel):
    id: str
    name: str
    state: Literal["draft", "active", "paused", "ended"]
    version: int
    definition: dict[str, Any]
    messages_sent: int
    cost_spent: Decimal
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None
    ended_at: datetime | None


class CampaignPage(BaseModel):
    items: list[CampaignRead]
    total: int


class VersionRead(BaseModel):
    version: int
    definition: dict[str, Any]
    created_at: datetime


class DecisionRead(BaseModel):
    campaign_id: str
    version: int
    customer_id: str
    occurrence: str
    outcome: Outcome
    at: datetime
    decided_at: datetime
    message_id: str | None
    cost: Decimal | None
    variables: dict[str, Any] | None
    delivery_status: str | None
    delivery_reason: str | None
    delivery_channel: str | None
    explanation: str


class WhyRead(BaseModel):
    campaign_id: str
    customer_id: str
    received: bool
    outcome: str | None
    sentence: str
    decisions: list[DecisionRead]


class DryRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    definition: CampaignDefinition


class DryRunRead(BaseModel):
    evaluated: int
    reached: int
    outcomes: dict[str, int]
    discount_cost: Decimal
    channel_cost: Decimal
    expected_cost: Decimal
    expected_redemption_rate: float
