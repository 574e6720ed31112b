"""Request and response models of the notifier's HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from crm_common.contract.types import FreeJson, Id, Locale, ShortText, _no_nul

Channel = Literal["email", "sms", "push"]
Key = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
TemplateText = Annotated[str, StringConstraints(max_length=100_000), AfterValidator(_no_nul)]
Subject = Annotated[str, StringConstraints(max_length=998), AfterValidator(_no_nul)]
VarName = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_nul)]


def storable_time(value: datetime) -> bool:
    """False for an aware datetime that has no UTC equivalent in years 1-9999 (the database driver
    cannot store it): year 1 at +14:00 is before year 1 in UTC, 9999-12-31 at -14:00 after 9999."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        return False
    return True


def _encodable(value: Any) -> Any:
    """Refuse lone surrogates (JSON allows a "\\ud800" escape; PostgreSQL and UTF-8 do not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "strings must be valid Unicode: lone surrogates (\\ud800-\\udfff) are not allowed"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _encodable(k)
            _encodable(v)
    elif isinstance(value, list):
        for v in value:
            _encodable(v)
    return value


# Free JSON as the contract bounds it (depth, size, NUL), and storable: no lone surrogates.
Json = Annotated[FreeJson, AfterValidator(_encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemplateContent(Strict):
    subject: Subject | None = Field(None, description="E-mail subject or push title (Jinja2)")
    body: TemplateText = Field(description="Text body (Jinja2, sandboxed, strict undefined)")
    html: TemplateText | None = Field(None, description="Optional HTML part of an e-mail (autoescaped)")
    variables: Annotated[list[VarName], Field(max_length=100)] = Field(
        default_factory=list, description="Variables the template may use"
    )
    sample: Json = Field(default_factory=dict, description="Sample values for the preview")


class TemplateCreate(TemplateContent):
    key: Key
    channel: Channel
    locale: Locale


class TemplateUpdate(TemplateContent):
    pass


class TemplateRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    key: str
    channel: str
    locale: str
    subject: str | None
    body: str
    html: str | None
    variables: list[str]
    sample: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


class TemplatePage(BaseModel):
    items: list[TemplateRead]
    total: int


class PreviewRequest(Strict):
    variables: Json | None = Field(None, description="Values to render with; the template's sample when absent")
    first_name: ShortText | None = None


class PreviewRead(BaseModel):
    subject: str | None
    body: str
    html: str | None


class MessageCreate(Strict):
    """A direct send by an operator (same semantics as a request on crm.messages.v1)."""

    id: Id | None = Field(None, description="Idempotency key; generated when absent")
    customer_id: Id
    kind: Literal["marketing", "transactional"] = "transactional"
    template: Key
    channel: Channel | None = None
    locale: Locale | None = None
    variables: Json = Field(default_factory=dict)
    campaign_id: Id | None = None
    offer_id: Id | None = None
    not_before: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None

    @field_validator("not_before", "expires_at")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        if value is not None and not storable_time(value):
            raise ValueError("out of range: in UTC it must fall within years 1-9999")
        return value


class AttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    provider: str
    outcome: str
    status_code: int | None
    error: str | None
    tries: int
    duration_ms: int
    at: datetime


class EventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    status: str
    reason: str | None
    url: str | None
    at: datetime


class MessageRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    customer_id: str
    kind: str
    template: str
    requested_channel: str | None
    channel: str | None
    locale: str | None
    campaign_id: str | None
    offer_id: str | None
    source_service: str
    state: str
    reason: str | None
    not_before: datetime | None
    expires_at: datetime | None
    next_attempt_at: datetime | None
    attempts: int
    provider: str | None
    provider_message_id: str | None
    cost: Decimal | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None


class MessageDetail(MessageRead):
    variables: dict[str, Any]
    delivery_attempts: list[AttemptRead] = Field(default_factory=list)
    events: list[EventRead] = Field(default_factory=list)


class MessagePage(BaseModel):
    items: list[MessageRead]
    total: int


class ConsentRead(BaseModel):
    granted: bool | None
    changed_at: datetime | None


class ContactRead(BaseModel):
    customer_id: str
    email: str | None
    phone: str | None
    push_tokens: int = Field(description="How many push tokens are registered")
    first_name: str | None
    last_name: str | None
    timezone: str | None
    locale: str | None
    preferred_channel: str | None
    consents: dict[str, ConsentRead]
    updated_at: datetime


class CallbackIn(Strict):
    """A provider's delivery report, signed with HMAC-SHA256 in `X-Signature: sha256=<hex>`."""

    message_id: Id | None = None
    provider_message_id: (
        Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_no_nul)] | None
    ) = None
    status: Literal["delivered", "failed"]
    reason: ShortText | None = None

    @model_validator(mode="after")
    def _one_id(self) -> CallbackIn:
        if not self.message_id and not self.provider_message_id:
            raise ValueError("message_id or provider_message_id is required")
        return self


class CallbackRead(BaseModel):
    message_id: str
    state: str
    applied: bool


class MessageCount(BaseModel):
    channel: str
    state: str
    reason: str | None = Field(description="why suppressed (frequency_cap, no_consented_channel, ...); null otherwise")
    messages: int


class CampaignMessages(BaseModel):
    campaign_id: str
    total: int
    counts: list[MessageCount]


class ChannelCostRow(BaseModel):
    month: str = Field(description="YYYY-MM of sending, UTC")
    channel: str
    sent: int
    delivered: int
    failed: int
    cost: Decimal


class ChannelCostReport(BaseModel):
    rows: list[ChannelCostRow]
    by_channel: dict[str, Decimal] = Field(description="Total cost per channel over every month")
    total: Decimal


class ProviderStatus(BaseModel):
    name: str
    channel: str
    state: str
    breaker: str
    consecutive_failures: int
    rate_limit_per_s: float
    sent: int
    permanent_failures: int
    transient_failures: int
    parked: int
    waiting: dict[str, int] = Field(default_factory=dict, description="Messages on this channel waiting, by state")
    last_error: str | None
    last_success_at: float | None
    last_failure_at: float | None
