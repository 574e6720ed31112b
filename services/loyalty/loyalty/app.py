"""The loyalty service's FastAPI app."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI

from crm_common.clock import Clock
from crm_common.service import ServiceRuntime, create_service_app
from loyalty import consumers, expiry
from loyalty.api import router
from loyalty.deps import ProgrammeCache
from loyalty.settings import TOPIC_EVENTS, TOPIC_MESSAGES, TOPIC_SEGMENTS, Settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and background work."""
    settings = settings or Settings()

    def configure(runtime: ServiceRuntime) -> None:
        # One group member for both topics; their messages keep the inbox names of the two
        # consumers they had before, so the first start after an upgrade re-applies nothing. Of crm.messages.v1
        # only offers' points-multiplier requests are applied (after the batch's events).
        runtime.add_consumer(
            "loyalty",
            [TOPIC_EVENTS, TOPIC_SEGMENTS, TOPIC_MESSAGES],
            {
                TOPIC_EVENTS: consumers.events_handler(runtime.clock, publish_accruals=settings.publish_accruals),
                TOPIC_SEGMENTS: consumers.segments_handler(runtime.clock),
                TOPIC_MESSAGES: consumers.messages_handler(runtime.clock),
            },
            inbox_names={TOPIC_EVENTS: "loyalty-events", TOPIC_SEGMENTS: "loyalty-segments"},
        )
        runtime.add_relay()
        runtime.add_sweep(
            "expiry",
            settings.expiry_sweep_interval_s,
            partial(expiry.run_sweep, batch=settings.expiry_sweep_batch),
        )

    app = create_service_app(
        settings=settings,
        title="CRM loyalty",
        description="Bonus programme: accounts, point lots, an immutable ledger, redemptions at the POS, expiry "
        "with reminders, personal goals, referrals and reports.",
        routers=[router],
        configure=configure,
        clock=clock,
    )
    app.state.programme_cache = ProgrammeCache(ttl=settings.programme_cache_ttl_s)
    return app
