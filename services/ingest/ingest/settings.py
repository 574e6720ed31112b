"""Configuration of the ingest service (environment variables prefixed INGEST_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from crm_common.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INGEST_")

    service_name: str = "ingest"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/ingest"
    # The relay publishes the archive's pending events in batches of this many.
    outbox_batch_size: int = 5000
    # A relay pass that cannot get its batch acknowledged in this time fails and is retried. Keep
    # it above the producer's request timeout (15 s), so a failed pass leaves nothing queued in
    # the producer that would reach a broker later, out of order and outside the relay's control.
    relay_send_timeout_s: float = 30.0
    max_body_bytes: int = 1 << 20
    max_batch_events: int = 1000
    # Per key, in events per second (a request costs its number of events); burst = one second.
    default_rate_limit_per_s: float = 20_000
    # How long a looked-up API key is trusted before it is read again (revocation on another
    # replica takes effect within this time; on the replica that revoked it, at once).
    key_cache_ttl_s: float = 5.0
    # Retry-After sent with 503 when the database cannot store events.
    unavailable_retry_after_s: int = 5
    # How long accepted events are kept in the archive, by received_at (older ones are deleted
    # once published). A retailer back-tests a campaign or a segment rule over a year and compares
    # it with the same weeks of the year before: a year, plus a month of margin for the comparison
    # window and late corrections.
    archive_retention_days: int = Field(400, ge=1)
