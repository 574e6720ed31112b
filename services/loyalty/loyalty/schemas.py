"""Request and response models of the loyalty API, and the programme configuration."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from crm_common.contract.types import Id, Money, Name, Points, ShortText

Rate = Annotated[Decimal, Field(ge=0, le=1, max_digits=12, decimal_places=8, allow_inf_nan=False)]
Multiplier = Annotated[Decimal, Field(ge=0, le=100, max_digits=12, decimal_places=6, allow_inf_nan=False)]
PositivePoints = Annotated[
    Decimal, Field(gt=0, le=Decimal(10) ** 12, max_digits=18, decimal_places=2, allow_inf_nan=False)
]
SignedPoints = Annotated[
    Decimal,
    Field(
        ge=-(Decimal(10) ** 12),
        le=Decimal(10) ** 12,
        max_digits=18,
        decimal_places=2,
        allow_inf_nan=False,
    ),
]
PointValue = Annotated[Decimal, Field(gt=0, le=1_000_000, max_digits=14, decimal_places=6, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tier(Strict):
    name: Name
    min_spend: Money = Field(description="12-month net spend from which the tier applies")
    rate: Rate = Field(description="share of the paid amount accrued as points value, e.g. 0.03")


class GoalRule(Strict):
    """Assign a goal to customers entering one of these segments (e.g. `visits_dropped`)."""

    segment_keys: Annotated[list[Id], Field(max_length=50)] = Field(
        default_factory=lambda: ["visits_dropped", "at_risk"],
        description="segments meaning 'visits fell below their usual' (segmentation's built-in `at_risk`)",
    )
    purchases: int = Field(3, ge=1, le=1000)
    days: int = Field(30, ge=1, le=3650)
    reward: PositivePoints = Decimal(300)
    template: Name = "loyalty_goal_offer"


class ProgrammeConfig(Strict):
    """The rules of the programme. Points are worth `point_value` money each."""

    base_rate: Rate = Decimal("0.01")
    tiers: Annotated[list[Tier], Field(max_length=20)] = Field(default_factory=list)
    tier_window_days: int = Field(365, ge=1, le=3650)
    category_multipliers: Annotated[dict[Id, Multiplier], Field(max_length=500)] = Field(default_factory=dict)
    excluded_categories: Annotated[list[Id], Field(max_length=500)] = Field(default_factory=list)
    expiry_days: int = Field(180, ge=1, le=36500)
    reminder_days: int = Field(14, ge=0, le=3650)
    max_redeem_share: Rate = Decimal("0.30")
    point_value: PointValue = Decimal("0.01")
    welcome_bonus: Points = Decimal(0)
    birthday_bonus: Points = Decimal(0)
    referral_bonus_referrer: Points = Decimal(0)
    referral_bonus_referred: Points = Decimal(0)
    goals: GoalRule | None = Field(default_factory=GoalRule, description="null disables personal goals")

    @model_validator(mode="after")
    def _tiers_distinct(self) -> ProgrammeConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError("tier names must be distinct and not 'base'")
        spends = [t.min_spend for t in self.tiers]
        if len(set(spends)) != len(spends):
            raise ValueError("tiers must have distinct min_spend")
        return self

    def tier_for(self, spend: Decimal) -> tuple[str, Decimal]:
        """The tier (name, rate) a 12-month spend qualifies for."""
        best = ("base", self.base_rate)
        best_min = Decimal(-1)
        for t in self.tiers:
            if spend >= t.min_spend and t.min_spend > best_min:
                best, best_min = (t.name, t.rate), t.min_spend
        return best

    def multiplier(self, category: str | None) -> Decimal:
        if category is not None and category in self.excluded_categories:
            return Decimal(0)
        if category is None:
            return Decimal(1)
        return self.category_multipliers.get(category, Decimal(1))


class ProgrammeRead(BaseModel):
    config: ProgrammeConfig
    updated_at: datetime | None


class LotRead(BaseModel):
    id: str
    kind: str
    earned_at: datetime
    expires_at: datetime
    points: Decimal
    remaining: Decimal
    expired_points: Decimal


class LedgerEntryRead(BaseModel):
    seq: int
    ref: str
    kind: str
    points: Decimal
    balance_after: Decimal
    debt_change: Decimal = Field(description="change of the account's points debt by this entry")
    occurred_at: datetime
    recorded_at: datetime
    lot_id: str | None
    order_id: str | None
    redemption_id: str | None
    data: dict[str, Any]


class GoalRead(BaseModel):
    id: str
    segment_key: str
    target: int
    progress: int
    reward: Decimal
    status: str
    assigned_at: datetime
    due_at: datetime
    closed_at: datetime | None


class AccountRead(BaseModel):
    customer_id: str
    balance: Decimal
    balance_value: Decimal = Field(description="money value of the balance")
    points_debt: Decimal = Field(
        description="points a refund could not reverse because they were spent; netted against the next credits"
    )
    tier: str
    spend_12m: Decimal
    referral_code: str
    referred_by: str | None
    purchases_count: int
    created_at: datetime
    lots: list[LotRead]
    goals: list[GoalRead]


class LedgerPage(BaseModel):
    customer_id: str
    entries: list[LedgerEntryRead]
    next_before: int | None = Field(description="pass as `before` for the next (older) page")


class RedemptionCreate(Strict):
    redemption_id: Id
    customer_id: Id
    check_amount: Annotated[Money, Field(gt=0)]
    points: PositivePoints | None = Field(None, description="points asked for; the most allowed when absent")
    order_id: Id | None = None
    store_id: Id | None = None


class RedemptionRead(BaseModel):
    redemption_id: str
    customer_id: str
    status: str
    check_amount: Decimal
    points_requested: Decimal | None
    points_applied: Decimal
    money_applied: Decimal
    points_returned: Decimal
    balance: Decimal | None = None
    order_id: str | None
    created_at: datetime
    cancelled_at: datetime | None


class AdjustmentCreate(Strict):
    adjustment_id: Id
    points: SignedPoints
    reason: Annotated[ShortText, Field(min_length=1)]

    @model_validator(mode="after")
    def _non_zero(self) -> AdjustmentCreate:
        if self.points == 0:
            raise ValueError("points must not be zero")
        if not self.reason.strip():
            raise ValueError("reason must not be blank")
        return self


class AdjustmentRead(BaseModel):
    adjustment_id: str
    customer_id: str
    points: Decimal
    reason: str
    balance: Decimal
    seq: int


class ReferralRead(BaseModel):
    customer_id: str
    referral_code: str
    referred_by: str | None
    referral_rewarded: bool


class MonthReport(BaseModel):
    month: date
    issued: Decimal
    reversed: Decimal
    redeemed: Decimal
    expired: Decimal
    adjusted: Decimal
    liability_points: Decimal
    liability_money: Decimal


class ProgrammeReport(BaseModel):
    months: list[MonthReport]
    issued_total: Decimal
    redeemed_total: Decimal
    redemption_rate: Decimal | None = Field(description="points redeemed (net of returns) / points issued")
    members: int
    purchasing_members: int
    repeat_purchasing_members: int
    repeat_purchase_rate: Decimal | None = Field(description="members with 2+ purchases / members with 1+")
