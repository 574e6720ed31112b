"""Typed configuration shared by every service; each service subclasses with its own prefix."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_PORTS = {"ingest": 8001, "segmentation": 8002, "loyalty": 8003, "offers": 8004, "notifier": 8005}

TOPIC_EVENTS = "crm.events.v1"
TOPIC_SEGMENTS = "crm.segments.v1"
TOPIC_LOYALTY = "crm.loyalty.v1"
TOPIC_MESSAGES = "crm.messages.v1"
TOPIC_DELIVERIES = "crm.deliveries.v1"
TOPIC_DLQ = "crm.dlq.v1"
ALL_TOPICS = (TOPIC_EVENTS, TOPIC_SEGMENTS, TOPIC_LOYALTY, TOPIC_MESSAGES, TOPIC_DELIVERIES, TOPIC_DLQ)


def shared(env: str, default: Any) -> Any:
    """Declare a setting read from an un-prefixed variable shared by all services."""
    return Field(default, validation_alias=AliasChoices(env, env.lower()))


class BaseServiceSettings(BaseSettings):
    """Settings every service has; subclasses set `env_prefix` (e.g. "LOYALTY_")."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    service_name: str = "service"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/crm"
    db_pool_size: int = 10
    # Client-side limit for one statement; set-based sweeps over millions of rows need minutes.
    db_command_timeout_s: float = 600
    # PostgreSQL's plan_cache_mode for the service's connections (see crm_common.db.create_engine).
    db_plan_cache_mode: Literal["auto", "force_custom_plan", "force_generic_plan"] = "auto"
    kafka_bootstrap_servers: str = shared("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    kafka_enable_idempotence: bool = shared("KAFKA_ENABLE_IDEMPOTENCE", False)
    kafka_topic_partitions: int = shared("KAFKA_TOPIC_PARTITIONS", 12)
    kafka_consumer_batch_max: int = 500
    kafka_consumer_batch_timeout_ms: int = 200
    # After this long without messages a consumer lets the broker hold its fetches for
    # kafka_consumer_idle_fetch_wait_ms, twice that after a quiet minute (fewer requests while
    # idle); a broker answers a fetch as soon as data arrives, so only the first message after
    # the quiet spell can be late (on Tansu 0.2-0.3 s with 3 s, up to about 1.5 s with 6 s).
    kafka_consumer_idle_after_s: float = 5.0
    kafka_consumer_idle_fetch_wait_ms: int = 3000
    kafka_max_poll_interval_ms: int = 300_000
    consumer_max_retries: int = 5
    consumer_retry_backoff_ms: int = 200
    consumers_enabled: bool = True
    sweeps_enabled: bool = True
    topic_prefix: str = shared("CRM_TOPIC_PREFIX", "")
    # Relays are woken by the commit that wrote outbox rows (in-process, and by PostgreSQL NOTIFY
    # from other processes); this timer only catches a wake-up that was missed.
    outbox_poll_interval_ms: int = 5000
    # A woken relay waits this long before its pass, so a burst of commits goes out as one batch.
    outbox_coalesce_ms: int = 25
    # Relays on a loop of their own in a thread, with their own engine and producer, so that a
    # busy service loop does not stretch their passes (crm_common.relay_thread).
    relays_in_thread: bool = True
    # Wake workers through LISTEN/NOTIFY (one connection per process); off, they use their timers.
    notify_enabled: bool = True
    # The cyclic GC's generation-0 threshold (0 keeps Python's 700): batch handlers allocate many
    # short-lived objects, and a higher threshold saves a few percent of CPU on the hot paths.
    gc_gen0_threshold: int = 50_000
    # How long the inbox remembers a message id (crm_common.retention deletes older ones). Shared
    # by every service, because ingest refuses replays reaching further back than this: the
    # consumers could no longer tell a replayed event from a new one.
    inbox_retention_days: int = Field(
        30, ge=1, validation_alias=AliasChoices("CRM_INBOX_RETENTION_DAYS", "crm_inbox_retention_days")
    )
    retention_sweep_interval_s: float = 3600
    # Rows deleted per transaction by retention sweeps.
    retention_batch_size: int = Field(5000, ge=1)
    outbox_batch_size: int = 1000
    # How long sent outbox rows are kept (crm_common.outbox): `POST /v1/ops/republish` reaches back
    # this far after a broker lost its data. 0 deletes a row once sent (no republish).
    outbox_retention_s: float = Field(3600, ge=0)
    # How often the outbox retention sweep deletes rows sent longer ago than outbox_retention_s.
    outbox_sweep_interval_s: float = Field(60, gt=0)
    log_level: str = shared("CRM_LOG_LEVEL", "INFO")
    log_json: bool = shared("CRM_LOG_JSON", True)
    # Largest request body any route reads (413 beyond it, counted as it streams in). Ingest's
    # own, lower limit for event bodies (1 MiB, CONTRACT.md) applies first on its routes.
    max_request_bytes: int = 2 << 20
    # Keys for the /v1 routes (comma-separated; plaintext or sha256:<hex>). Empty: they all answer 401.
    # Ingest ignores it: it checks the keys kept in its own database.
    api_keys: SecretStr = shared("CRM_API_KEYS", SecretStr(""))
