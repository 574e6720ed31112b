"""Rows as the domain changes them in memory: one dataclass per table, its fields named as the table's columns.

The repository builds them from rows by column name (`COLUMNS` is what it selects) and writes them back by the
same names, so a new column never shifts a field. `is_new` and `dirty` say what `Book.flush` has to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar


@dataclass(slots=True)
class LotState:
    """A row of `lots`."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "customer_id",
        "kind",
        "earned_at",
        "expires_at",
        "points",
        "remaining",
    )
    id: str
    customer_id: str
    kind: str
    earned_at: datetime
    expires_at: datetime
    points: Decimal
    remaining: Decimal
    is_new: bool = False
    dirty: bool = False


@dataclass(slots=True)
class AccountState:
    """A row of `accounts`, locked for the transaction; `spend` (the tier window's) and `lots` are loaded on
    demand."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "customer_id",
        "balance",
        "points_debt",
        "tier",
        "referral_code",
        "referred_by",
        "referral_rewarded",
        "purchases_count",
        "first_purchase_at",
        "last_purchase_at",
        "birth_date",
        "birthday_awarded_year",
        "created_at",
    )
    customer_id: str
    balance: Decimal
    points_debt: Decimal
    tier: str
    referral_code: str
    referred_by: str | None
    referral_rewarded: bool
    purchases_count: int
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    birth_date: date | None
    birthday_awarded_year: int | None
    created_at: datetime
    spend: Decimal | None = None
    lots: dict[str, LotState] | None = None
    dirty: bool = False


@dataclass(slots=True)
class Entry:
    """A row of `ledger` about to be appended (the ledger is never updated)."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "ref",
        "customer_id",
        "kind",
        "points",
        "balance_after",
        "debt_change",
        "occurred_at",
        "recorded_at",
        "lot_id",
        "order_id",
        "redemption_id",
        "data",
    )
    ref: str
    customer_id: str
    kind: str
    points: Decimal
    balance_after: Decimal
    debt_change: Decimal
    occurred_at: datetime
    recorded_at: datetime
    lot_id: str | None
    order_id: str | None
    redemption_id: str | None
    data: dict[str, Any]


@dataclass(slots=True)
class Allocation:
    """A row of `redemption_lots`: what a redemption took from a lot and gave back to it."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("redemption_id", "lot_id", "points", "returned")
    redemption_id: str
    lot_id: str
    points: Decimal
    returned: Decimal
    dirty: bool = False


@dataclass(slots=True)
class RedemptionState:
    """A row of `redemptions`, with the balance after its ledger entry (read with it)."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "redemption_id",
        "customer_id",
        "request_hash",
        "check_amount",
        "points_requested",
        "points_applied",
        "money_applied",
        "points_returned",
        "status",
        "order_id",
        "store_id",
        "created_at",
        "settled_at",
        "cancelled_at",
    )
    redemption_id: str
    customer_id: str
    request_hash: str
    check_amount: Decimal
    points_requested: Decimal | None
    points_applied: Decimal
    money_applied: Decimal
    points_returned: Decimal
    status: str
    order_id: str | None
    store_id: str | None
    created_at: datetime
    settled_at: datetime | None
    cancelled_at: datetime | None
    balance_after: Decimal | None = None
    dirty: bool = False


@dataclass(slots=True)
class PurchaseState:
    """A row of `purchases`."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "customer_id",
        "order_id",
        "message_id",
        "occurred_at",
        "total",
        "paid",
        "refunded",
        "points_accrued",
        "points_reversed",
        "redemption_id",
        "points_redeemed",
        "points_returned",
        "reconciliation",
    )
    customer_id: str
    order_id: str
    message_id: str
    occurred_at: datetime
    total: Decimal
    paid: Decimal
    refunded: Decimal
    points_accrued: Decimal
    points_reversed: Decimal
    redemption_id: str | None
    points_redeemed: Decimal
    points_returned: Decimal
    reconciliation: str | None
    is_new: bool = False
    dirty: bool = False


@dataclass(slots=True)
class GoalState:
    """A row of `goals`."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id",
        "customer_id",
        "segment_key",
        "target",
        "progress",
        "reward",
        "status",
        "assigned_at",
        "due_at",
        "closed_at",
    )
    id: str
    customer_id: str
    segment_key: str
    target: int
    progress: int
    reward: Decimal
    status: str
    assigned_at: datetime
    due_at: datetime
    closed_at: datetime | None
    dirty: bool = False


@dataclass(slots=True)
class PointOfferState:
    """A row of `point_offers`."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "message_id",
        "customer_id",
        "campaign_id",
        "offer_id",
        "multiplier",
        "requested_at",
        "valid_until",
        "order_id",
        "points",
        "points_reversed",
        "used_at",
    )
    message_id: str
    customer_id: str
    campaign_id: str
    offer_id: str
    multiplier: Decimal
    requested_at: datetime
    valid_until: datetime
    order_id: str | None = None
    points: Decimal = Decimal(0)
    points_reversed: Decimal = Decimal(0)
    used_at: datetime | None = None
    dirty: bool = False
