"""The event API of CONTRACT.md: envelope, every event type and its properties, and the topic message."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crm_common.contract.types import (
    Currency,
    Email,
    Id,
    Locale,
    LongText,
    Money,
    Name,
    Phone,
    Points,
    Quantity,
    ShortText,
    TimeZoneName,
    check_free_json,
)

SOURCES = ("pos", "site", "app", "ops")
Source = Literal["pos", "site", "app", "ops"]
EventType = Literal[
    "customer_updated", "purchase", "refund", "product_viewed", "cart_updated", "site_visit", "feedback", "custom"
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
Channel = Literal["email", "sms", "push"]
MAX_FUTURE = timedelta(minutes=5)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class Consents(Strict):
    """A consent is a JSON boolean: "yes", 1 or "on" are refused, not read as true."""

    email: StrictBool | None = None
    sms: StrictBool | None = None
    push: StrictBool | None = None


class CustomerUpdatedProps(Strict):
    """Any subset; absent fields are unchanged, null clears (see `model_fields_set`)."""

    email: Email | None = None
    phone: Phone | None = None
    push_tokens: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=20)] | None = (
        None
    )
    first_name: ShortText | None = None
    last_name: ShortText | None = None
    birth_date: date | None = None
    gender: Literal["female", "male", "other", "unknown"] | None = None
    city: ShortText | None = None
    timezone: TimeZoneName | None = None
    locale: Locale | None = None
    acquisition_channel: ShortText | None = None
    referred_by: Id | None = None
    consents: Consents | None = None
    preferred_channel: Channel | None = None

    @field_validator("birth_date")
    @classmethod
    def _plausible_birth_date(cls, v: date | None) -> date | None:
        if v is not None and not (date(1900, 1, 1) <= v <= date(2100, 1, 1)):
            raise ValueError("must be between 1900-01-01 and 2100-01-01")
        return v

    @field_validator("push_tokens")
    @classmethod
    def _tokens_no_nul(cls, v: list[str] | None) -> list[str] | None:
        if v and any("\x00" in t for t in v):
            raise ValueError("must not contain NUL characters")
        return v


# Rules checked only on posted events (validation context POSTED): events archived under older
# rules must still load downstream and on replay, or a replay would dead-letter them.
POSTED: dict[str, Any] = {"posted": True}
# How far a purchase's `total` may be from the sum of its lines, per line: each line may have
# been rounded to the cent on its own.
TOTAL_TOLERANCE_PER_LINE = Decimal("0.01")


def _posted(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("posted"))


def _show(amount: Decimal) -> str:
    """An amount as a POS writes it: two decimals, more only when they are not zero."""
    cents = amount.quantize(Decimal("0.01"))
    return f"{cents:f}" if cents == amount else f"{amount.normalize():f}"


class Item(Strict):
    """A line: `quantity` × `unit_price`, less `discount` (for the whole line, not per unit);
    `cost` is per unit."""

    sku: Id
    name: ShortText | None = None
    category: ShortText | None = None
    quantity: Quantity = Decimal(1)
    unit_price: Money
    discount: Money | None = None
    cost: Money | None = None
    size: ShortText | None = None
    color: ShortText | None = None
    brand: ShortText | None = None

    @field_validator("discount")
    @classmethod
    def _discount_within_line(cls, v: Decimal | None, info: ValidationInfo) -> Decimal | None:
        quantity, unit_price = info.data.get("quantity"), info.data.get("unit_price")
        if v is None or not _posted(info) or quantity is None or unit_price is None:
            return v
        line = quantity * unit_price
        if v > line:
            raise ValueError(f"discount {_show(v)} is more than the line's price {_show(line)} (quantity × unit_price)")
        return v

    @property
    def amount(self) -> Decimal:
        """What the line costs the customer: quantity × unit_price − discount."""
        return self.quantity * self.unit_price - (self.discount or Decimal(0))


class PurchaseProps(Strict):
    order_id: Id
    items: Annotated[list[Item], Field(min_length=1, max_length=500)]
    total: Money
    currency: Currency
    coupon_code: Id | None = None
    points_redeemed: Points | None = None
    redemption_id: Id | None = None

    @field_validator("total")
    @classmethod
    def _total_matches_items(cls, v: Decimal, info: ValidationInfo) -> Decimal:
        # Skipped when an item failed: that item's error says what is wrong.
        items: list[Item] | None = info.data.get("items")
        if not items or not _posted(info):
            return v
        expected = sum((item.amount for item in items), Decimal(0))
        tolerance = TOTAL_TOLERANCE_PER_LINE * len(items)
        if abs(v - expected) > tolerance:
            per_line = "" if len(items) == 1 else f", {_show(TOTAL_TOLERANCE_PER_LINE)} per line"
            raise ValueError(
                f"total {_show(v)} does not match the items (sum {_show(expected)} ± {_show(tolerance)}{per_line})"
            )
        return v


class RefundItem(Strict):
    sku: Id
    quantity: Quantity = Decimal(1)
    unit_price: Money | None = None


class RefundProps(Strict):
    order_id: Id
    items: Annotated[list[RefundItem], Field(max_length=500)] | None = None
    amount: Money

    @field_validator("amount")
    @classmethod
    def _refunds_something(cls, v: Decimal, info: ValidationInfo) -> Decimal:
        if v == 0 and _posted(info):
            raise ValueError("must be greater than 0: a refund of nothing changes nothing")
        return v


class ProductViewedProps(Strict):
    sku: Id
    category: ShortText
    price: Money | None = None
    name: ShortText | None = None


class CartUpdatedProps(Strict):
    items: Annotated[list[Item], Field(max_length=500)]
    total: Money


class SiteVisitProps(Strict):
    page: Annotated[str, Field(max_length=2048)] | None = None
    referrer: Annotated[str, Field(max_length=2048)] | None = None
    utm_source: ShortText | None = None
    utm_campaign: ShortText | None = None
    city: ShortText | None = None

    @field_validator("page", "referrer")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


class FeedbackProps(Strict):
    rating: Annotated[int, Field(ge=1, le=5, strict=True)]
    order_id: Id | None = None
    comment: LongText | None = None
    topic: Literal["quality", "price", "service", "other"] | None = None


class CustomProps(BaseModel):
    """A custom event: its `name` and free properties (bounded in size and depth)."""

    model_config = ConfigDict(extra="allow")
    name: Name

    @model_validator(mode="after")
    def _bounded(self) -> CustomProps:
        check_free_json(self.model_extra or {})
        return self


PROPERTIES_MODELS: dict[str, type[BaseModel]] = {
    "customer_updated": CustomerUpdatedProps,
    "purchase": PurchaseProps,
    "refund": RefundProps,
    "product_viewed": ProductViewedProps,
    "cart_updated": CartUpdatedProps,
    "site_visit": SiteVisitProps,
    "feedback": FeedbackProps,
    "custom": CustomProps,
}


class EventIn(Strict):
    """One event as posted to `POST /v1/events`.

    Validation context: `source` (the API key's source) and `now` (the server clock). Its
    properties are checked with the rules of posted events (POSTED): totals that match their
    items, discounts within their line, refunds of more than zero.
    """

    event_id: Id
    type: EventType
    customer_id: Id | None = None
    anonymous_id: Id | None = None
    occurred_at: AwareDatetime
    store_id: Id | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> EventIn:
        ctx = info.context or {}
        source = ctx.get("source")
        now: datetime = ctx.get("now") or datetime.now(UTC)
        if self.customer_id is None:
            if not (self.anonymous_id and source in ("site", "app") and self.type != "customer_updated"):
                raise ValueError("customer_id is required (site/app events may carry anonymous_id instead)")
        if self.occurred_at > now + MAX_FUTURE:
            raise ValueError("occurred_at is more than 5 minutes in the future")
        if self.occurred_at.year < 1970:
            raise ValueError("occurred_at must not be before 1970")
        model = PROPERTIES_MODELS[self.type]
        self.properties = model.model_validate(self.properties, context=POSTED).model_dump(
            mode="json", exclude_unset=True
        )
        return self


def validate_event(data: Any, *, source: str, now: datetime) -> EventIn:
    """Validate one posted event; raises pydantic.ValidationError with per-field locations."""
    return EventIn.model_validate(data, context={"source": source, "now": now})


class EventMessage(BaseModel):
    """An accepted event as published on `crm.events.v1` (keyed by customer_id or anonymous_id)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    source: Source
    event_id: str
    type: EventType
    customer_id: str | None = None
    anonymous_id: str | None = None
    occurred_at: datetime
    received_at: datetime
    store_id: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.customer_id or f"anon:{self.anonymous_id}"

    def typed_properties(self) -> BaseModel:
        """The properties parsed into the model of this event's type."""
        return PROPERTIES_MODELS[self.type].model_validate(self.properties)


def message_id(source: str, event_id: str) -> str:
    """The stable topic-message id of an event: unique because a source has no ':' in it."""
    return f"{source}:{event_id}"
