"""Configuration of the segmentation service (environment variables prefixed SEGMENTATION_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from crm_common.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SEGMENTATION_")

    service_name: str = "segmentation"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/segmentation"
    # Bigger batches amortise the per-batch recompute and segment statements.
    kafka_consumer_batch_max: int = 2000
    # Time-driven entries and exits (lapsing, windows sliding) are re-evaluated this often.
    segments_sweep_interval_s: float = 300.0
    # RFM quintiles and the value-tier margin threshold are refreshed this often.
    rfm_sweep_interval_s: float = 3600.0
    # Half-life-like decay (days) of the recency weighting of favourite categories and products.
    favourites_decay_days: float = 90.0
    install_builtin_segments: bool = True
