"""The ingest service's FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from crm_common.clock import Clock
from crm_common.service import create_service_app
from ingest.settings import Settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and background work."""
    settings = settings or Settings()
    return create_service_app(
        settings=settings,
        title="CRM ingest",
        description="The ingest service of the CRM platform (not built yet: ops endpoints only).",
        clock=clock,
    )
