"""The offers service's FastAPI app."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI

from crm_common.clock import Clock
from crm_common.service import ServiceRuntime, create_service_app
from offers import consumers, triggers
from offers.api import router
from offers.evaluation import CampaignCache
from offers.peers import Peers
from offers.settings import TOPIC_DELIVERIES, TOPIC_EVENTS, TOPIC_LOYALTY, TOPIC_SEGMENTS, Settings


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer and background work."""
    settings = settings or Settings()
    cache = CampaignCache(ttl=settings.campaign_cache_ttl_s)

    def configure(runtime: ServiceRuntime) -> None:
        peers = Peers(runtime.http, settings)
        runtime.state.peers = peers
        # One group member for the four topics (one fetch and heartbeat for all of them). Events
        # come first in a batch: a digest that is ahead of the purchases waits for them. Loyalty's
        # balances and tiers come before the evaluations, so a message names the newest known.
        runtime.add_consumer(
            "offers",
            [TOPIC_EVENTS, TOPIC_SEGMENTS, TOPIC_DELIVERIES, TOPIC_LOYALTY],
            {
                TOPIC_LOYALTY: consumers.loyalty_handler(),
                TOPIC_EVENTS: consumers.events_handler(runtime.clock, settings, cache, peers),
                TOPIC_SEGMENTS: consumers.segments_handler(runtime.clock, settings, cache, peers),
                TOPIC_DELIVERIES: consumers.deliveries_handler(),
            },
        )
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
