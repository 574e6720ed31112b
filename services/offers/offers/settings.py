"""Configuration of the offers service (environment variables prefixed OFFERS_)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from crm_common.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OFFERS_")

    service_name: str = "offers"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/offers"
