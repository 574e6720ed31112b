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


class Item(Strict):
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


class PurchaseProps(Strict):
    order_id: Id
    items: Annotated[list[Item], Field(min_length=1, max_length=500)]
    total: Money
    currency: Currency
    coupon_code: Id | None = None
    points_redeemed: Points | None = None
    redemption_id: Id | None = None


class RefundItem(Strict):
    sku: Id
    quantity: Quantity = Decimal(1)
    unit_price: Money | None = None


class RefundProps(Strict):
    order_id: Id
    items: Annotated[list[RefundItem], Field(max_length=500)] | None = None
    amount: Money


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

    Validation context: `source` (the API key's source) and `now` (the server clock).
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
        self.properties = model.model_validate(self.properties).model_dump(mode="json", exclude_unset=True)
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
