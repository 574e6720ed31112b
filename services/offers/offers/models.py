"""Tables owned by the offers service: campaigns and their versions, the customer cache (profile digest,
memberships, time zone, birthday, last purchase), abandonment timers, the decision log, the purchases
and refunds kept for attribution, and coupons with their redemptions."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    Numeric,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_common.db import service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


MONEY = Numeric(20, 4)


class Campaign(Base):
    """A campaign's current state and version; `definition` is a validated CampaignDefinition."""

    __tablename__ = "campaigns"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)  # draft | active | paused | ended
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB)
    trigger_kind: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    starts_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ends_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Budget counters, advanced in the statement that records the decisions.
    messages_sent: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cost_spent: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (Index("ix_campaigns_state", "state"),)


class CampaignVersion(Base):
    """Every version a campaign had; decisions name the version they were made under."""

    __tablename__ = "campaign_versions"
    campaign_id: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Customer(Base):
    """What offers knows of a customer: from events (time zone, birthday, purchases) and from the
    profile digest on crm.segments.v1 (or read from segmentation when missing or stale)."""

    __tablename__ = "customers"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    first_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    timezone: Mapped[str | None] = mapped_column(Text, nullable=True)
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    purchases: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    digest: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    digest_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    value_tier: Mapped[str | None] = mapped_column(Text, nullable=True)
    predicted_next_purchase: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    margin: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        Index("ix_customers_predicted_next_purchase", "predicted_next_purchase"),
        Index("ix_customers_last_purchase_at", "last_purchase_at"),
    )


class CustomerProduct(Base):
    """What a customer bought, per SKU, from the purchases on crm.events.v1: the favourite product
    within a category (their own wine, not their bread) is read from here."""

    __tablename__ = "customer_products"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    sku: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str | None] = mapped_column(Text, nullable=True)
    category: Mapped[str | None] = mapped_column(Text, nullable=True)
    size: Mapped[str | None] = mapped_column(Text, nullable=True)
    color: Mapped[str | None] = mapped_column(Text, nullable=True)
    quantity: Mapped[Decimal] = mapped_column(Numeric(20, 4))
    last_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_customer_products_customer_id_category", "customer_id", "category"),)


class Membership(Base):
    """A customer's current segments, kept from segment.entered / segment.exited."""

    __tablename__ = "memberships"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    segment_key: Mapped[str] = mapped_column(Text, primary_key=True)
    entered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_memberships_segment_key", "segment_key"),)


class Timer(Base):
    """A durable wait: an event followed by no purchase within the wait fires the campaign; a purchase
    cancels it. One open timer per campaign and customer; later matching events add to its context."""

    __tablename__ = "timers"
    campaign_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    occurrence: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text)  # waiting | fired | cancelled
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    context: Mapped[dict[str, Any]] = mapped_column(JSONB)
    __table_args__ = (
        Index("ix_timers_due_at", "due_at", postgresql_where=text("state = 'waiting'")),
        Index(
            "uq_timers_open",
            "campaign_id",
            "customer_id",
            unique=True,
            postgresql_where=text("state = 'waiting'"),
        ),
        Index("ix_timers_customer_id", "customer_id", postgresql_where=text("state = 'waiting'")),
    )


class Decision(Base):
    """One evaluation of a customer against a campaign for one trigger occurrence, and its outcome;
    the notifier's verdict joins it by message id."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(Text)
    occurrence: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    message_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    cost: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    variables: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    delivery_status: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivery_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivery_channel: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivery_cost: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    delivery_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        UniqueConstraint("campaign_id", "customer_id", "occurrence", name="uq_decisions_occurrence"),
        Index("ix_decisions_customer_id_at", "customer_id", "at"),
        Index("ix_decisions_message_id", "message_id", postgresql_where=text("message_id IS NOT NULL")),
        Index("ix_decisions_campaign_id_outcome", "campaign_id", "outcome"),
        Index("ix_decisions_campaign_id_id", "campaign_id", "id"),
    )


class Purchase(Base):
    """An order offers consumed from crm.events.v1 (the paid total), for attributing revenue to campaigns."""

    __tablename__ = "purchases"
    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revenue: Mapped[Decimal] = mapped_column(MONEY)
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        UniqueConstraint("customer_id", "order_id", name="uq_purchases_order"),
        Index("ix_purchases_customer_id_occurred_at", "customer_id", "occurred_at"),
        Index("ix_purchases_occurred_at", "occurred_at"),
    )


class Refund(Base):
    """A refund of (part of) an order: it reduces that order's revenue."""

    __tablename__ = "refunds"
    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_refunds_customer_id_order_id", "customer_id", "order_id"),)


class CampaignPoints(Base):
    """Bonus points loyalty awarded because of a campaign (a crm.loyalty.v1 event naming `data.campaign_id`):
    positive for a points-multiplier bonus, negative for its reversal by a refund. `value` is their money value
    (points x the programme's point value, as loyalty's event states it; NULL when the event carries neither).
    The campaign report reads it for the campaign's cost."""

    __tablename__ = "campaign_points"
    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    campaign_id: Mapped[str] = mapped_column(Text)
    offer_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    customer_id: Mapped[str] = mapped_column(Text)
    points: Mapped[Decimal] = mapped_column(Numeric(20, 2))
    value: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_campaign_points_campaign_id", "campaign_id"),)


class CustomerLoyalty(Base):
    """The latest loyalty balance and tier of a customer from crm.loyalty.v1 (each kept by the time of the event
    that set it, so a late event never overwrites a newer one): `points_balance` and `loyalty_tier` of messages."""

    __tablename__ = "customer_loyalty"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    points_balance: Mapped[Decimal | None] = mapped_column(Numeric(20, 2), nullable=True)
    balance_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    loyalty_tier: Mapped[str | None] = mapped_column(Text, nullable=True)
    tier_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Coupon(Base):
    """A personal coupon code issued with a `requested` decision (one per decision, by its message id),
    holding what it gives as it was when issued: the offer's kind, value, resolved target and rules."""

    __tablename__ = "coupons"
    code: Mapped[str] = mapped_column(Text, primary_key=True)
    message_id: Mapped[str] = mapped_column(Text)
    campaign_id: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)  # percent | fixed | free_delivery | points_multiplier
    value: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    multiplier: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    target: Mapped[str] = mapped_column(Text)  # basket | skus | category
    target_skus: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    target_category: Mapped[str | None] = mapped_column(Text, nullable=True)
    min_basket: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    min_quantity: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_uses: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    max_uses_per_customer: Mapped[int | None] = mapped_column(Integer, nullable=True)
    uses: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (
        UniqueConstraint("message_id", name="uq_coupons_message_id"),
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses_within_max"),
        Index("ix_coupons_customer_id_created_at", "customer_id", "created_at"),
    )


class CouponRedemption(Base):
    """A coupon applied to an order (by the POS API or a purchase event), once per (code, order_id);
    `rolled_back_at` is set by an explicit roll back or the order's refund. Redemptions count as
    conversions and `discount` as cost in campaign reports."""

    __tablename__ = "coupon_redemptions"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    code: Mapped[str] = mapped_column(Text)
    campaign_id: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    customer_id: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str] = mapped_column(Text)
    discount: Mapped[Decimal] = mapped_column(MONEY)
    order_total: Mapped[Decimal | None] = mapped_column(MONEY, nullable=True)
    applies_to: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'"))
    redeemed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    source: Mapped[str] = mapped_column(Text)  # api | event
    __table_args__ = (
        UniqueConstraint("code", "order_id", name="uq_coupon_redemptions_code_order_id"),
        CheckConstraint("source IN ('api', 'event')", name="source_known"),
        Index("ix_coupon_redemptions_order_id", "order_id"),
        Index("ix_coupon_redemptions_campaign_id_customer_id", "campaign_id", "customer_id"),
    )
