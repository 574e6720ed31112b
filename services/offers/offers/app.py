"""The offers service's FastAPI app."""

from __future__ import annotations

import gc
from functools import partial

from fastapi import FastAPI

from crm_common.clock import Clock
from crm_common.service import ServiceRuntime, create_service_app
from offers import consumers, triggers
from offers.api import router
from offers.evaluation import CampaignCache
from offers.peers import Peers
from offers.settings import TOPIC_DELIVERIES, TOPIC_EVENTS, TOPIC_SEGMENTS, Settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and background work."""
    settings = settings or Settings()
    cache = CampaignCache(ttl=settings.campaign_cache_ttl_s)

    def configure(runtime: ServiceRuntime) -> None:
        if settings.gc_gen0_threshold > 0:
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, gen1, gen2)
        peers = Peers(runtime.http, settings)
        app.state.peers = peers
        runtime.add_consumer(
            "offers-events", [TOPIC_EVENTS], consumers.events_handler(runtime.clock, settings, cache, peers)
        )
        runtime.add_consumer(
            "offers-segments", [TOPIC_SEGMENTS], consumers.segments_handler(runtime.clock, settings, cache, peers)
        )
        runtime.add_consumer("offers-deliveries", [TOPIC_DELIVERIES], consumers.deliveries_handler())
        runtime.add_relay()
        runtime.add_sweep("triggers", settings.sweep_interval_s, partial(triggers.run_time_triggers, settings=settings))
        runtime.add_sweep("timers", settings.timers_sweep_interval_s, partial(triggers.run_timers, settings=settings))

    app = create_service_app(
        settings=settings,
        title="CRM offers",
        description="Campaigns and triggers that turn segments, events and time into personal offers, each "
        "held against a control group, with a decision log that says why a customer did or didn't get one.",
        routers=[router],
        configure=configure,
        clock=clock,
    )
    app.state.settings = settings
    app.state.campaign_cache = cache
    return app
