"""Configuration of the offers service (environment variables prefixed OFFERS_)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from crm_common.settings import (
    TOPIC_DELIVERIES,
    TOPIC_EVENTS,
    TOPIC_LOYALTY,
    TOPIC_MESSAGES,
    TOPIC_SEGMENTS,
    BaseServiceSettings,
)

__all__ = ["TOPIC_DELIVERIES", "TOPIC_EVENTS", "TOPIC_LOYALTY", "TOPIC_MESSAGES", "TOPIC_SEGMENTS", "Settings"]


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OFFERS_")

    service_name: str = "offers"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/offers"
    # Every call planned: `decisions` grows fast from empty, and the decision statement's generic plan,
    # made while it was one page, probed it by a scan per candidate (97 ms a call at 3,000 decisions).
    db_plan_cache_mode: Literal["auto", "force_custom_plan", "force_generic_plan"] = "force_custom_plan"
    kafka_consumer_batch_max: int = 2000
    # Offers sits on the path from an event to a customer's message: a short fetch wait keeps it quick
    # (a busy topic fills batches anyway).
    kafka_consumer_batch_timeout_ms: int = 50

    # Peers read over HTTP at decision time (campaign validation, missing or stale profile fields).
    segmentation_url: str = "http://127.0.0.1:8002"
    notifier_url: str = "http://127.0.0.1:8005"
    peer_timeout_s: float = 3.0
    # Parallel profile reads while a batch waits for missing personalisation fields.
    profile_fetch_concurrency: int = 16
    # A cached profile digest older than this is re-read before it personalises a message.
    profile_stale_after_s: float = 7 * 86400

    # The platform-wide global control group: this share of customers gets no marketing campaign.
    global_control_share: float = 0.05
    global_control_salt: str = "global-control"
    # Default share of each campaign's audience held out as its control group.
    default_control_share: float = 0.10
    # Two campaigns firing for one customer within this many minutes collide; the higher priority wins.
    collision_window_minutes: float = 60.0

    # Dry-run economics: share of offers expected to be redeemed, and channel costs.
    expected_redemption_rate: float = 0.15
    sms_cost_per_message: Decimal = Decimal("0.05")
    email_cost_per_message: Decimal = Decimal("0")
    push_cost_per_message: Decimal = Decimal("0")
    # What a free-delivery offer costs the shop (for the guard, budgets and the dry-run).
    delivery_cost: Decimal = Decimal("5")

    # Time-driven triggers (inactivity, purchase window, schedule, birthday, abandonment timers).
    sweep_interval_s: float = 60.0
    timers_sweep_interval_s: float = 30.0
    sweep_batch: int = 20_000
    # Campaigns are re-read at most this often by the consumers (a change reaches every replica within it).
    campaign_cache_ttl_s: float = 2.0

    # Campaign report: revenue per member is capped at this percentile of its arm before the
    # statistics (one huge order cannot decide a campaign); below this many members in an arm the
    # report warns that its interval is not to be trusted; the margin rate turns incremental revenue
    # into incremental margin (a query parameter overrides it).
    report_cap_percentile: float = Field(99.9, ge=50, le=100)
    report_min_sample_per_arm: int = Field(150, ge=2)
    report_margin_rate: float = Field(0.3, ge=0, le=1)
