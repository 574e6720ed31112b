"""Configuration of the segmentation service (environment variables prefixed SEGMENTATION_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from crm_common.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SEGMENTATION_", extra="ignore", populate_by_name=True)

    service_name: str = "segmentation"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/segmentation"
