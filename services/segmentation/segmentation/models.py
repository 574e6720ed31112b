"""Tables owned by the segmentation service (created by migrations 0001-0002; queries in repository/).

tests/test_schema.py compares these definitions with the migrated schema, so they cannot drift.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Numeric,
    SmallInteger,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_common.db import service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class Purchase(Base):
    """One order of a customer, stored once by (customer_id, order_id): the fact profiles derive from."""

    __tablename__ = "purchases"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    order_id: Mapped[str] = mapped_column(Text, primary_key=True)
    message_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    local_date: Mapped[date] = mapped_column(Date)
    local_dow: Mapped[int] = mapped_column(SmallInteger)
    local_hour: Mapped[int] = mapped_column(SmallInteger)
    total: Mapped[Decimal] = mapped_column(Numeric(20, 4))
    gross: Mapped[Decimal] = mapped_column(Numeric(24, 4))
    discount: Mapped[Decimal] = mapped_column(Numeric(24, 4))
    cost: Mapped[Decimal | None] = mapped_column(Numeric(24, 4))
    discounted: Mapped[bool] = mapped_column(Boolean)
    refunded_amount: Mapped[Decimal] = mapped_column(Numeric(24, 4), default=Decimal(0))


class PurchaseItem(Base):
    """One line of an order, with what windowed rules filter on (category, sku, local day of week)."""

    __tablename__ = "purchase_items"
    __table_args__ = (
        Index("ix_purchase_items_customer_time", "customer_id", "occurred_at"),
        Index("ix_purchase_items_category_time", "category", "occurred_at"),
    )
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    order_id: Mapped[str] = mapped_column(Text, primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(Text)
    size: Mapped[str | None] = mapped_column(Text)
    color: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[Decimal] = mapped_column(Numeric(20, 4))
    amount: Mapped[Decimal] = mapped_column(Numeric(24, 4))
    refunded_qty: Mapped[Decimal] = mapped_column(Numeric(20, 4), default=Decimal(0))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    local_date: Mapped[date] = mapped_column(Date)
    local_dow: Mapped[int] = mapped_column(SmallInteger)


class Refund(Base):
    __tablename__ = "refunds"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    refund_id: Mapped[str] = mapped_column(Text, primary_key=True)
    order_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric(20, 4))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # None is SQL NULL (not JSON null): the refund matcher reads a missing item list as "no items".
    items: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))


class TraitFact(Base):
    """The latest value of one trait by event time ('_feedback', '_first_touch' are internal facts)."""

    __tablename__ = "trait_facts"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    field: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[Any | None] = mapped_column(JSONB)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    message_id: Mapped[str] = mapped_column(Text)


class Identity_(Base):
    __tablename__ = "identities"
    anonymous_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeliveryFact(Base):
    __tablename__ = "delivery_facts"
    __table_args__ = (Index("ix_delivery_facts_customer", "customer_id"),)
    message_id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    channel: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Profile(Base):
    """Computed features of one customer, recomputed from the facts."""

    __tablename__ = "profiles"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    traits: Mapped[dict[str, Any]] = mapped_column(JSONB)
    consents: Mapped[dict[str, Any]] = mapped_column(JSONB)
    acquisition_channel: Mapped[str | None] = mapped_column(Text)
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    orders: Mapped[int] = mapped_column(Integer)
    revenue: Mapped[Decimal] = mapped_column(Numeric(24, 4))
    margin: Mapped[Decimal] = mapped_column(Numeric(24, 4))
    avg_check: Mapped[Decimal | None] = mapped_column(Numeric(24, 4))
    discount_share: Mapped[float | None] = mapped_column(Double)
    discounted_orders_share: Mapped[float | None] = mapped_column(Double)
    discount_affinity: Mapped[str | None] = mapped_column(Text)
    top_categories: Mapped[list[str]] = mapped_column(JSONB)
    favourite_category: Mapped[str | None] = mapped_column(Text)
    favourite_product: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    favourite_size: Mapped[str | None] = mapped_column(Text)
    favourite_color: Mapped[str | None] = mapped_column(Text)
    dow_counts: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    favourite_dow: Mapped[int | None] = mapped_column(SmallInteger)
    favourite_hour: Mapped[int | None] = mapped_column(SmallInteger)
    cadence_days: Mapped[float | None] = mapped_column(Double)
    predicted_next_purchase: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lifecycle: Mapped[str] = mapped_column(Text)
    rfm_r: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_f: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_m: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_group: Mapped[str | None] = mapped_column(Text)
    value_tier: Mapped[str | None] = mapped_column(Text)
    engagement: Mapped[dict[str, Any]] = mapped_column(JSONB)
    last_feedback_rating: Mapped[int | None] = mapped_column(SmallInteger)
    last_feedback_topic: Mapped[str | None] = mapped_column(Text)
    last_feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeatureStat(Base):
    """Population statistics refreshed by the RFM sweep (quintile cut points, core-margin threshold)."""

    __tablename__ = "feature_stats"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Segment(Base):
    __tablename__ = "segments"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[dict[str, Any]] = mapped_column(JSONB)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (Index("ix_memberships_customer", "customer_id"),)
    segment_id: Mapped[str] = mapped_column(Text, ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    entered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MembershipLogEntry(Base):
    """Every entry and exit; its id makes the stable id of the published message."""

    __tablename__ = "membership_log"
    __table_args__ = (Index("ix_membership_log_segment", "segment_id", "at"),)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    segment_id: Mapped[str] = mapped_column(Text)
    customer_id: Mapped[str] = mapped_column(Text)
    change: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SegmentSize(Base):
    __tablename__ = "segment_sizes"
    segment_id: Mapped[str] = mapped_column(Text, ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
