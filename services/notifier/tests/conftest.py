"""Fixtures: a real SMTP server (aiosmtpd), a scriptable HTTP provider, the app under test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller

from crm_common.clock import ManualClock
from crm_common.contract.events import CustomerUpdatedProps
from crm_common.infra import free_port
from crm_common.sinks import LoopbackProvider
from crm_common.testing.helpers import Mailbox, eventually, run_app
from notifier.app import create_app
from notifier.contacts import apply_customer_updates
from notifier.repository import NotifierRepository
from notifier.settings import Settings


@pytest.fixture(scope="session")
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture(scope="session")
def provider_server() -> Iterator[LoopbackProvider]:
    server = LoopbackProvider().start()
    yield server
    server.stop()


@pytest.fixture
def provider(provider_server: LoopbackProvider) -> LoopbackProvider:
    provider_server.up()
    provider_server.received.clear()
    provider_server._script.clear()
    provider_server.default_status = 200
    provider_server.delay_s = 0.0
    return provider_server


def make_settings(
    url: str,
    broker: Any,
    topic_prefix: str,
    smtp_port: int,
    provider: LoopbackProvider,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "kafka_bootstrap_servers": broker.bootstrap,
        "topic_prefix": topic_prefix,
        "log_json": False,
        "public_base_url": "http://test",
        "smtp_port": smtp_port,
        "sms_url": provider.url + "/v1/sms",
        "push_base_url": provider.url,
        "send_retry_base_s": 0.01,
        "send_retry_max_s": 0.05,
        "breaker_threshold": 3,
        "breaker_cooldown_s": 0.3,
        "dispatch_poll_interval_s": 0.1,
        "sms_rate_per_s": 1000,
        "email_rate_per_s": 1000,
        "kafka_consumer_batch_timeout_ms": 100,
        "sweeps_enabled": False,
        "consumers_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture(loop_scope="session")
async def start_app(make_database, broker, topic_prefix, smtp, provider, clock) -> Callable[..., Any]:
    """`async with start_app(**settings) as (client, app)`: the notifier on a fresh database."""

    @asynccontextmanager
    async def _start(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
        url = await make_database("notifier")
        settings = make_settings(url, broker, topic_prefix, smtp[1], provider, **overrides)
        app = create_app(settings, clock=clock)
        async with run_app(app) as client:
            yield client, app

    return _start


async def seed_contact(app: Any, customer_id: str, at: datetime | None = None, **props: Any) -> None:
    """Apply a customer_updated the way the consumer does (for tests that do not need Kafka)."""
    runtime = app.state.runtime
    async with runtime.sessionmaker() as session:
        await apply_customer_updates(
            repo=NotifierRepository(session),
            updates=[(customer_id, CustomerUpdatedProps.model_validate(props), at or runtime.clock.now())],
        )
        await session.commit()


async def add_template(
    client: httpx.AsyncClient,
    key: str,
    channel: str,
    *,
    body: str,
    subject: str | None = None,
    html: str | None = None,
    variables: list[str] | None = None,
    locale: str = "en",
) -> dict[str, Any]:
    r = await client.post(
        "/v1/templates",
        json={
            "key": key,
            "channel": channel,
            "locale": locale,
            "subject": subject,
            "body": body,
            "html": html,
            "variables": variables or [],
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


async def message_state(client: httpx.AsyncClient, message_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/messages/{message_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for_state(client: httpx.AsyncClient, message_id: str, state: str, *, what: str) -> dict[str, Any]:
    """The message once it has reached `state` (fails the test after the usual timeout)."""

    async def reached() -> dict[str, Any] | None:
        m = await message_state(client, message_id)
        return m if m["state"] == state else None

    return await eventually(reached, what=what)  # type: ignore[no-any-return]


def wake(app: Any) -> None:
    app.state.notifier.dispatcher.wake()


@pytest.fixture
def clock() -> ManualClock:
    # Monday 2026-01-05 12:00 UTC: daytime in UTC, 07:00 (quiet) in New York.
    from datetime import UTC

    return ManualClock(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))
