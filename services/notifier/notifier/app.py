"""The notifier service's FastAPI app."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.service import ServiceRuntime, create_service_app
from crm_common.settings import TOPIC_EVENTS, TOPIC_MESSAGES
from notifier.api import public, router
from notifier.consumers import make_handler
from notifier.deliveries import delivery_event, emit
from notifier.deps import Notifier
from notifier.dispatcher import Dispatcher
from notifier.policy import Policy
from notifier.providers import build_providers
from notifier.rendering import Renderer
from notifier.repository import NotifierRepository
from notifier.settings import Settings
from notifier.tokens import TokenSigner
from notifier.tracking import Links


class _Expired:
    __slots__ = ("campaign_id", "channel", "customer_id", "id", "offer_id")

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.id, self.customer_id, self.channel, self.campaign_id, self.offer_id = row


async def expire_messages(session: AsyncSession, now: datetime) -> int:
    """Sweep: every waiting message past its expiry becomes expired, with its delivery event."""
    rows = await NotifierRepository(session).expire_open(now)
    await emit(
        session,
        [delivery_event(message=_Expired(r), status="expired", at=now, reason="expired") for r in rows],
    )
    return len(rows)


async def release_stale_leases(session: AsyncSession, now: datetime) -> int:
    """Sweep: messages whose dispatcher died while sending go back to the queue (sent again)."""
    return await NotifierRepository(session).release_stale_leases(now)


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """Build the app; the lifespan creates the engine, producer, consumer, relay and dispatcher."""
    settings = settings or Settings()

    def configure(runtime: ServiceRuntime) -> None:
        policy = Policy.from_settings(settings)
        signer = TokenSigner(settings.token_secret)
        links = Links(settings.public_base_url, signer)
        renderer = Renderer()
        providers = build_providers(settings)
        dispatcher = Dispatcher(
            sessionmaker=runtime.sessionmaker,
            settings=settings,
            clock=runtime.clock,
            providers=providers,
            renderer=renderer,
            links=links,
            policy=policy,
            on_recorded=runtime.wake_relays,
        )
        runtime.state.notifier = Notifier(settings, policy, renderer, signer, links, providers, dispatcher)
        runtime.add_relay()
        runtime.add_consumer(
            "notifier",
            [TOPIC_EVENTS, TOPIC_MESSAGES],
            make_handler(policy=policy, clock=runtime.clock, wake=dispatcher.wake),
        )
        runtime.add_sweep("expire_messages", 30, expire_messages)
        runtime.add_sweep("release_stale_leases", 60, release_stale_leases)
        if settings.dispatcher_enabled:
            for i in range(max(1, settings.dispatch_workers)):
                worker = runtime.add_worker(
                    f"dispatcher:{i}",
                    dispatcher.run_once,
                    interval_s=settings.dispatch_poll_interval_s,
                    full_batch=settings.dispatch_batch_size,
                )
                dispatcher.wakers.append(worker.wake)
        # After the workers have stopped: the sends in flight are recorded before the pools close.
        runtime.on_close(providers.aclose)

        async def close_renderer() -> None:
            renderer.close()

        runtime.on_close(close_renderer)

    return create_service_app(
        settings=settings,
        title="CRM notifier",
        description="Contacts and consents, templates, and delivery of e-mail, SMS and push.",
        routers=[router],
        # Provider callbacks are HMAC-signed, tracking and unsubscribe links carry signed tokens.
        public_routers=[public],
        configure=configure,
        clock=clock,
    )
