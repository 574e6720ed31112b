"""Tables owned by the loyalty service: programme, accounts, point lots, the immutable ledger, purchases and their
monthly spend, redemptions, goals, and the points-multiplier offers of campaigns."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Identity, Index, Integer, Numeric, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_common.db import service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


POINTS = Numeric(20, 2)
MONEY = Numeric(20, 4)


class Programme(Base):
    """The programme rules (one row); `config` is a validated ProgrammeConfig."""

    __tablename__ = "programme"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Account(Base):
    """A customer's loyalty account; `balance` always equals the sum of its ledger and of its lots.

    `points_debt` is what refunds could not reverse because the points were spent; it equals the ledger's sum of
    `debt_change` and is netted against the next credits. While it is above zero nothing is spendable."""

    __tablename__ = "accounts"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    balance: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    points_debt: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    tier: Mapped[str] = mapped_column(Text, server_default=text("'base'"))
    referral_code: Mapped[str] = mapped_column(Text, unique=True)
    referred_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    referral_rewarded: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    purchases_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    birth_date: Mapped[date | None] = mapped_column(Date, nullable=True)
    birthday_awarded_year: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Lot(Base):
    """Points earned together; spent and expired oldest first. `id` is the ref of the entry that created it."""

    __tablename__ = "lots"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    earned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    points: Mapped[Decimal] = mapped_column(POINTS)
    remaining: Mapped[Decimal] = mapped_column(POINTS)
    expired_points: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    reminded_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index(
            "ix_lots_customer_open",
            "customer_id",
            "expires_at",
            postgresql_where=text("remaining > 0"),
        ),
        Index("ix_lots_expires_open", "expires_at", postgresql_where=text("remaining > 0")),
    )


class LedgerEntry(Base):
    """One immutable movement of points and/or of the points debt (a trigger refuses UPDATE and DELETE)."""

    __tablename__ = "ledger"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    ref: Mapped[str] = mapped_column(Text, unique=True)
    customer_id: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)
    points: Mapped[Decimal] = mapped_column(POINTS)
    balance_after: Mapped[Decimal] = mapped_column(POINTS)
    debt_change: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lot_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    order_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    redemption_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    __table_args__ = (Index("ix_ledger_customer_seq", "customer_id", "seq"),)


class Purchase(Base):
    """A purchase seen on the event stream, with what it accrued, redeemed and had refunded."""

    __tablename__ = "purchases"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    order_id: Mapped[str] = mapped_column(Text, primary_key=True)
    message_id: Mapped[str] = mapped_column(Text)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    total: Mapped[Decimal] = mapped_column(MONEY)
    paid: Mapped[Decimal] = mapped_column(MONEY)
    refunded: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    points_accrued: Mapped[Decimal] = mapped_column(POINTS)
    points_reversed: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    redemption_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    points_redeemed: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    points_returned: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    reconciliation: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (Index("ix_purchases_customer_occurred", "customer_id", "occurred_at"),)


class SpendMonth(Base):
    """A customer's spend (paid - refunded) over the purchases of one UTC month, kept by accrual for the tier."""

    __tablename__ = "spend_months"
    customer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    spend: Mapped[Decimal] = mapped_column(MONEY)


class Redemption(Base):
    """Points applied at a checkout, idempotent by `redemption_id`."""

    __tablename__ = "redemptions"
    redemption_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(Text)
    check_amount: Mapped[Decimal] = mapped_column(MONEY)
    points_requested: Mapped[Decimal | None] = mapped_column(POINTS, nullable=True)
    points_applied: Mapped[Decimal] = mapped_column(POINTS)
    money_applied: Mapped[Decimal] = mapped_column(MONEY)
    points_returned: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    status: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    store_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (Index("ix_redemptions_customer", "customer_id"),)


class RedemptionLot(Base):
    """How many points a redemption took from a lot, and how many went back to it."""

    __tablename__ = "redemption_lots"
    redemption_id: Mapped[str] = mapped_column(Text, primary_key=True)
    lot_id: Mapped[str] = mapped_column(Text, primary_key=True)
    points: Mapped[Decimal] = mapped_column(POINTS)
    returned: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))


class Goal(Base):
    """A personal goal: `target` purchases before `due_at` earns `reward` points, once."""

    __tablename__ = "goals"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    segment_key: Mapped[str] = mapped_column(Text)
    target: Mapped[int] = mapped_column(Integer)
    progress: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    reward: Mapped[Decimal] = mapped_column(POINTS)
    status: Mapped[str] = mapped_column(Text)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index(
            "uq_goals_one_active",
            "customer_id",
            unique=True,
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_goals_active_due", "due_at", postgresql_where=text("status = 'active'")),
    )


class PointOffer(Base):
    """A bonus-points multiplier offers sent the customer (a `points_multiplier` MessageRequested on
    crm.messages.v1, one row per message): the first purchase in [requested_at, valid_until) earns its base
    points times `multiplier`, the extra booked as an `offer_bonus` entry. Used once: `order_id` names the purchase,
    `points` the extra points, `points_reversed` what refunds took back."""

    __tablename__ = "point_offers"
    message_id: Mapped[str] = mapped_column(Text, primary_key=True)
    customer_id: Mapped[str] = mapped_column(Text)
    campaign_id: Mapped[str] = mapped_column(Text)
    offer_id: Mapped[str] = mapped_column(Text)
    multiplier: Mapped[Decimal] = mapped_column(Numeric(8, 4))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    order_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    points: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    points_reversed: Mapped[Decimal] = mapped_column(POINTS, server_default=text("0"))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        Index("ix_point_offers_open", "customer_id", "valid_until", postgresql_where=text("order_id IS NULL")),
        # One bonus per purchase.
        Index(
            "uq_point_offers_order",
            "customer_id",
            "order_id",
            unique=True,
            postgresql_where=text("order_id IS NOT NULL"),
        ),
    )
