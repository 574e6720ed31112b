"""The segmentation service's FastAPI app."""

from __future__ import annotations

from fastapi import FastAPI

from crm_common.clock import Clock
from crm_common.db import session_scope
from crm_common.service import ServiceRuntime, create_service_app
from crm_common.settings import TOPIC_DELIVERIES, TOPIC_EVENTS
from segmentation.api import router
from segmentation.builtin import install_builtin_segments
from segmentation.consumers import deliveries_handler, events_handler
from segmentation.segments import sweep_rfm, sweep_segments
from segmentation.settings import Settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and background work."""
    settings = settings or Settings()

    async def configure(runtime: ServiceRuntime) -> None:
        if settings.install_builtin_segments:
            async with session_scope(runtime.sessionmaker) as session:
                await install_builtin_segments(session=session, now=runtime.clock.now())
        # One group member for both topics; their messages keep the inbox names of the two
        # consumers they had before, so the first start after an upgrade re-applies nothing.
        runtime.add_consumer(
            "segmentation",
            [TOPIC_EVENTS, TOPIC_DELIVERIES],
            {
                TOPIC_EVENTS: events_handler(settings, runtime.clock),
                TOPIC_DELIVERIES: deliveries_handler(settings, runtime.clock),
            },
            inbox_names={TOPIC_EVENTS: "segmentation-events", TOPIC_DELIVERIES: "segmentation-deliveries"},
        )
        runtime.add_relay()
        runtime.add_sweep("segments", settings.segments_sweep_interval_s, sweep_segments)
        runtime.add_sweep("rfm", settings.rfm_sweep_interval_s, sweep_rfm)

    return create_service_app(
        settings=settings,
        title="CRM segmentation",
        description="Customer profiles with computed features, a segment rule language and real-time segment membership.",
        routers=[router],
        configure=configure,
        clock=clock,
    )
