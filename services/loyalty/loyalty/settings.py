"""Configuration of the loyalty service (environment variables prefixed LOYALTY_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from crm_common.settings import (
    TOPIC_EVENTS,
    TOPIC_LOYALTY,
    TOPIC_MESSAGES,
    TOPIC_SEGMENTS,
    BaseServiceSettings,
)

__all__ = ["TOPIC_EVENTS", "TOPIC_LOYALTY", "TOPIC_MESSAGES", "TOPIC_SEGMENTS", "Settings"]


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LOYALTY_")

    service_name: str = "loyalty"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/loyalty"
    # How often the expiry sweep runs (expiry, reminders, goal expiry, birthday bonuses).
    expiry_sweep_interval_s: float = 60.0
    # At most this many accounts are expired per sweep pass, so one pass never holds locks for long.
    expiry_sweep_batch: int = 5000
    # Publish `points.accrued` for every accrual (offers and analytics listen; off halves outbox traffic).
    publish_accruals: bool = True
    # Routes re-read the programme's rules at most this often (a change reaches every replica within it).
    programme_cache_ttl_s: float = 2.0
