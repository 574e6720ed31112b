"""Tables of the notifier: contacts, templates, messages, attempts and delivery events."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Identity,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_common.db import service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


# A message waits in one of these states until the dispatcher settles it.
OPEN_STATES = ("pending", "deferred", "queued", "retrying")
FINAL_STATES = ("sent", "delivered", "failed", "suppressed", "expired")


class Contact(Base):
    """How to reach a customer and what they agreed to, from `customer_updated` events."""

    __tablename__ = "contacts"
    customer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(16))
    push_tokens: Mapped[list[str]] = mapped_column(JSONB, default=list, server_default="[]")
    first_name: Mapped[str | None] = mapped_column(String(256))
    last_name: Mapped[str | None] = mapped_column(String(256))
    timezone: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(35))
    preferred_channel: Mapped[str | None] = mapped_column(String(8))
    # Consent per channel: None = never given (no marketing), with the time of the last change
    # so an older event replayed later cannot undo a newer unsubscribe.
    consent_email: Mapped[bool | None] = mapped_column(Boolean)
    consent_sms: Mapped[bool | None] = mapped_column(Boolean)
    consent_push: Mapped[bool | None] = mapped_column(Boolean)
    consent_email_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consent_sms_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consent_push_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Template(Base):
    """A message template for one key, channel and locale, with the variables it may use."""

    __tablename__ = "templates"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(8))
    locale: Mapped[str] = mapped_column(String(35))
    subject: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    html: Mapped[str | None] = mapped_column(Text)
    variables: Mapped[list[str]] = mapped_column(JSONB, default=list)
    sample: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("key", "channel", "locale", name="uq_templates_key_channel_locale"),)


class Message(Base):
    """One requested message and where it stands; every message ends in a final state."""

    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    template: Mapped[str] = mapped_column(String(128))
    requested_channel: Mapped[str | None] = mapped_column(String(8))
    channel: Mapped[str | None] = mapped_column(String(8))
    locale: Mapped[str | None] = mapped_column(String(35))
    variables: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    campaign_id: Mapped[str | None] = mapped_column(String(128))
    offer_id: Mapped[str | None] = mapped_column(String(128))
    source_service: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    provider: Mapped[str | None] = mapped_column(String(16))
    provider_message_id: Mapped[str | None] = mapped_column(String(256))
    cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 4))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        Index("ix_messages_customer_created", "customer_id", "created_at"),
        Index(
            "ix_messages_due",
            "next_attempt_at",
            postgresql_where="state IN ('pending','deferred','queued','retrying')",
        ),
        Index("ix_messages_provider_message_id", "provider_message_id"),
        Index("ix_messages_sending", "lease_until", postgresql_where="state = 'sending'"),
        Index("ix_messages_campaign", "campaign_id", postgresql_where="campaign_id IS NOT NULL"),
    )


class DeliveryAttempt(Base):
    """One call to a provider for a message, with its outcome."""

    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))  # ok, transient, permanent, skipped
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    tries: Mapped[int] = mapped_column(Integer, default=1)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MessageEvent(Base):
    """A delivery event of a message (also on crm.deliveries.v1); the id dedupes repeats."""

    __tablename__ = "message_events"
    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(128), index=True)
    customer_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
