"""Configuration of the notifier service (environment variables prefixed NOTIFIER_)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic_settings import SettingsConfigDict

from crm_common.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFIER_")

    service_name: str = "notifier"
    database_url: str = "postgresql+asyncpg://crm:crm@127.0.0.1:55432/notifier"
    # Every call planned: the messages table grows fast from empty, and a generic plan made early kept
    # scanning it whole (crm_common.db.create_engine).
    db_plan_cache_mode: Literal["auto", "force_custom_plan", "force_generic_plan"] = "force_custom_plan"

    # Public base URL of this service: tracking pixels, click redirects and unsubscribe links.
    public_base_url: str = "http://127.0.0.1:8005"
    # Secret for tracking and unsubscribe tokens (HMAC-SHA256); set a real one in production.
    token_secret: str = "dev-notifier-token-secret"

    # Policy.
    default_locale: str = "en"
    default_timezone: str = "UTC"
    quiet_hours_start: str = "21:00"
    quiet_hours_end: str = "09:00"
    quiet_hours_for_transactional: bool = False
    marketing_cap: int = 3
    marketing_cap_days: int = 7
    # A request for a customer without contact data waits this long, then is suppressed.
    contact_wait_s: float = 600
    contact_recheck_s: float = 30

    # Templates: a render (send or preview) running longer fails as render_timeout.
    render_timeout_ms: float = 500

    # Dispatcher.
    dispatcher_enabled: bool = True
    dispatch_batch_size: int = 200
    dispatch_workers: int = 2
    # Sends in flight per process (the HTTP providers keep as many pooled connections, at least 10).
    dispatch_concurrency: int = 32
    # Fallback only: commits that record messages wake the dispatcher; this timer picks up
    # deferred (quiet hours) and retried messages when they fall due.
    dispatch_poll_interval_s: float = 5.0
    dispatch_lease_s: float = 300
    # In-process retries of one send on transient errors, with exponential backoff and jitter.
    send_retries: int = 2
    send_retry_base_s: float = 0.2
    send_retry_max_s: float = 2.0
    # Parking after the in-process retries: next attempt after base * 2**n (jittered, capped).
    park_base_s: float = 30
    park_max_s: float = 900
    max_attempts: int = 30
    # Circuit breaker per provider: this many transient failures in a row open it for the cooldown.
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 10

    # E-mail over SMTP.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_start_tls: bool = False
    smtp_use_tls: bool = False
    smtp_timeout_s: float = 10
    email_from: str = "CRM <no-reply@example.com>"
    email_unsubscribe_mailto: str | None = None
    email_rate_per_s: float = 50

    # SMS over an HTTP JSON API.
    sms_url: str = "http://127.0.0.1:8091/v1/sms"
    sms_api_key: str = "dev-sms-key"
    sms_sender: str = "CRM"
    sms_timeout_s: float = 5
    sms_rate_per_s: float = 100
    sms_cost_per_message: Decimal = Decimal("0.05")
    sms_callback_secret: str = "dev-sms-callback-secret"

    # Push over an FCM-HTTP-v1-shaped API.
    push_base_url: str = "http://127.0.0.1:8092"
    push_project_id: str = "crm-dev"
    push_access_token: str = "dev-push-token"
    push_timeout_s: float = 5
    push_rate_per_s: float = 500
    push_callback_secret: str = "dev-push-callback-secret"

    email_callback_secret: str = "dev-email-callback-secret"
