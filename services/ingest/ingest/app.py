"""The ingest service's FastAPI app."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from crm_common.clock import Clock
from crm_common.contract.events import EventIn
from crm_common.outbox import OutboxRelay
from crm_common.service import ServiceRuntime, create_service_app
from ingest.api import router
from ingest.keys import KeyCache
from ingest.ratelimit import RateLimiter
from ingest.relay import EventArchiveQueue
from ingest.retention import ARCHIVE_SWEEP, archive_sweep
from ingest.schemas import EventBatchIn
from ingest.settings import Settings

DESCRIPTION = """\
Accepts purchase and interaction events from POS terminals, sites and apps (`POST /v1/events`),
archives every accepted event durably (202 means stored), and publishes it to `crm.events.v1`
keyed by customer. Duplicates by (source, event_id) are reported and never published twice.
Ops: replay of a time range, lookup of an archived event, API key management.
"""


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and the archive's relay."""
    settings = settings or Settings()

    def configure(runtime: ServiceRuntime) -> None:
        runtime.add_relay(
            OutboxRelay(
                name="ingest-events",
                sessionmaker=runtime.sessionmaker,
                producer=runtime.producer,
                batch_size=settings.outbox_batch_size,
                topic_prefix=settings.topic_prefix,
                send_timeout_s=settings.relay_send_timeout_s,
                queue=EventArchiveQueue(),
            )
        )
        runtime.add_sweep(ARCHIVE_SWEEP, settings.retention_sweep_interval_s, archive_sweep(settings))

    app = create_service_app(
        settings=settings,
        title="CRM ingest",
        description=DESCRIPTION,
        routers=[router],
        # Ingest's routes check the keys of its own database (sources and scopes), not CRM_API_KEYS.
        require_api_key=False,
        configure=configure,
        clock=clock,
    )
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    app.state.rate_limiter = RateLimiter()
    _document_event_bodies(app)
    return app


def _document_event_bodies(app: FastAPI) -> None:
    """Put EventIn and EventBatchIn in the OpenAPI components: the events route parses its body
    itself (for per-event partial acceptance) but documents it, so clients and fuzzers see it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        _, defs = models_json_schema(
            [(EventIn, "validation"), (EventBatchIn, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
