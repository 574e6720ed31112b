"""Campaign definitions and the API's request and response models."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from crm_common.contract.events import EventType
from crm_common.contract.types import MAX_AMOUNT, Id, Money, Name, Quantity, ShortText
from offers import codes

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
    coupon: bool = Field(True, description="issue a personal coupon code with each message (not for info offers)")
    coupon_pattern: Annotated[str, Field(max_length=codes.MAX_CODE_LENGTH)] = Field(
        codes.DEFAULT_PATTERN,
        description=f"the code's shape: X is a random symbol of {codes.ALPHABET!r}, anything else (A-Z, 0-9, '-') "
        f"is kept; at least {codes.MIN_BITS} bits of randomness ({codes.BITS_PER_SYMBOL:.2f} bits per X)",
    )
    max_uses: Annotated[int, Field(ge=1, le=1000)] = Field(1, description="redemptions per code")
    max_uses_per_customer: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="redemptions per customer over all codes of the campaign (none: no limit)"
    )

    @field_validator("coupon_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return codes.check_pattern(v)

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


class DecisionFields(BaseModel):
    """What a decision says, however it is listed."""

    campaign_id: str
    version: int
    customer_id: str
    occurrence: str
    outcome: Outcome
    at: datetime
    decided_at: datetime
    message_id: str | None
    cost: Decimal | None
    delivery_status: str | None
    delivery_reason: str | None
    delivery_channel: str | None


class CampaignDecisionRead(DecisionFields):
    id: int = Field(description="the decision's id: pages go on after the last one")


class CampaignDecisionPage(BaseModel):
    items: list[CampaignDecisionRead]
    next_after: int | None = Field(description="pass as `after` for the next page; null on the last")


class DecisionRead(DecisionFields):
    variables: dict[str, Any] | None
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


# --- Coupons at the POS -------------------------------------------------------------------------

CouponReason = Literal[
    "expired",
    "not_yet_valid",
    "used",
    "customer_limit",
    "other_customer",
    "minimum_basket",
    "minimum_quantity",
    "not_applicable",
]
MAX_LINES = 1000


def _code(v: str) -> str:
    value = codes.normalise(v)
    if value is None:
        raise ValueError(f"must be a coupon code: 1-{codes.MAX_CODE_LENGTH} characters of A-Z, 0-9 and '-'")
    return value


def _encodable(v: str) -> str:
    # The POS path sends text to PostgreSQL itself: a lone surrogate (a JSON "\\ud800") is refused here.
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return v


PosId = Annotated[Id, AfterValidator(_encodable)]
PosText = Annotated[ShortText, AfterValidator(_encodable)]
CouponCode = Annotated[str, Field(min_length=1, max_length=codes.MAX_CODE_LENGTH + 8, description="as printed")]


class PosLine(Strict):
    """A basket line: `quantity` x `price` (the unit price before any coupon)."""

    sku: PosId
    category: PosText | None = None
    quantity: Quantity
    price: Money


class Basket(Strict):
    code: CouponCode
    customer_id: PosId
    lines: Annotated[list[PosLine], Field(min_length=1, max_length=MAX_LINES)]
    order_total: Money | None = Field(None, description="the basket's total for min_basket (default: sum of lines)")

    @field_validator("code")
    @classmethod
    def _normal_code(cls, v: str) -> str:
        return _code(v)

    @field_validator("lines")
    @classmethod
    def _bounded_total(cls, v: list[PosLine]) -> list[PosLine]:
        if sum((line.quantity * line.price for line in v), Decimal(0)) > MAX_AMOUNT:
            raise ValueError(f"the lines add up to more than {MAX_AMOUNT}")
        return v


class ValidateRequest(Basket):
    pass


class RedeemRequest(Basket):
    order_id: PosId


class RollbackRequest(Strict):
    order_id: PosId


class AppliedLine(BaseModel):
    sku: str
    amount: Decimal
    discount: Decimal


class ValidateRead(BaseModel):
    valid: bool
    reason: CouponReason | None = None
    message: str | None = None
    code: str
    kind: str
    discount: Decimal | None = None
    free_delivery: bool = False
    multiplier: Decimal | None = None
    applies_to: list[AppliedLine] = Field(default_factory=list)
    valid_until: datetime


class RedemptionRead(BaseModel):
    code: str
    order_id: str
    customer_id: str
    campaign_id: str
    version: int
    kind: str
    discount: Decimal
    free_delivery: bool
    multiplier: Decimal | None
    applies_to: list[AppliedLine]
    order_total: Decimal | None
    redeemed_at: datetime
    rolled_back_at: datetime | None
    source: Literal["api", "event"]
    state: Literal["applied", "rolled_back"]


class CouponSummary(BaseModel):
    code: str
    state: Literal["active", "used", "expired", "not_yet_valid"]
    customer_id: str
    campaign_id: str
    version: int
    message_id: str
    kind: str
    value: Decimal | None
    multiplier: Decimal | None
    target: Literal["basket", "skus", "category"]
    target_skus: list[str]
    target_category: str | None
    min_basket: Decimal | None
    min_quantity: int | None
    uses: int
    max_uses: int
    max_uses_per_customer: int | None
    valid_from: datetime
    valid_until: datetime
    created_at: datetime


class CouponRead(CouponSummary):
    redemptions: list[RedemptionRead]
