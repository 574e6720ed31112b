"""Request and response models of the ingest API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from crm_common.auth import SCOPES
from crm_common.contract.events import EventIn, EventMessage, EventType, Source
from crm_common.contract.types import Name
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

Scope = Literal["events:write", "events:read", "replay", "keys:admin"]
assert set(Scope.__args__) == set(SCOPES)  # type: ignore[attr-defined]


class EventBatchIn(BaseModel):
    """A batch body: `{"events": [...]}` with at most 1,000 events and 1 MiB (documentation only:
    the route parses and validates each event itself so one bad event does not reject the rest)."""

    model_config = ConfigDict(extra="forbid")
    events: Annotated[list[EventIn], Field(min_length=1, max_length=1000)]


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class EventResult(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    errors: list[FieldError] = Field(default_factory=list)


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[EventResult]


REPLAY_MIN = datetime(1970, 1, 1, tzinfo=UTC)
REPLAY_MAX = datetime(3000, 1, 1, tzinfo=UTC)


class ReplayIn(BaseModel):
    """Re-publish archived events whose `by` timestamp is in [from, to)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: AwareDatetime = Field(alias="from")
    to: AwareDatetime
    types: Annotated[list[EventType], Field(min_length=1, max_length=8)] | None = None
    by: Literal["received_at", "occurred_at"] = "received_at"

    @field_validator("from_", "to")
    @classmethod
    def _within_storable_time(cls, value: datetime) -> datetime:
        # Archived times lie between these; clamping keeps "from the beginning" natural to say
        # and keeps out-of-range datetimes away from the database driver.
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            return REPLAY_MIN if value.year < 2000 else REPLAY_MAX
        return min(max(value, REPLAY_MIN), REPLAY_MAX)

    @model_validator(mode="after")
    def _ordered(self) -> ReplayIn:
        if self.to <= self.from_:
            raise ValueError("'to' must be after 'from'")
        return self


class ReplayRead(BaseModel):
    replayed: int
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    types: list[str] | None
    by: str


class ArchivedEventRead(BaseModel):
    seq: int
    source: Source
    event_id: str
    type: str
    received_at: datetime
    pending: bool = Field(description="true while waiting to be (re)published")
    message: EventMessage


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    source: Source
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=4)]
    rate_limit_per_s: Annotated[float, Field(gt=0, le=1_000_000)] | None = Field(
        None, description="events per second; null uses the service default"
    )


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    source: str
    scopes: list[str]
    rate_limit_per_s: float | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="the secret; shown only in this answer, stored hashed")
