"""Fixtures: segmentation and the notifier served over real HTTP (uvicorn, in this process), the offers
app under test in-process, and helpers to feed its topics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest_asyncio
from sqlalchemy import text

from crm_common import serde
from crm_common.db import create_engine, create_sessionmaker
from crm_common.testing.helpers import TEST_AUTH, eventually, publish, read_topic, run_app, serve_app
from notifier.app import create_app as notifier_app
from notifier.settings import Settings as NotifierSettings
from offers.app import create_app as offers_app
from offers.settings import TOPIC_MESSAGES, Settings
from segmentation.app import create_app as segmentation_app
from segmentation.settings import Settings as SegmentationSettings

from .factories import template


def stack_settings(url: str, broker: Any, prefix: str, **kw: Any) -> dict[str, Any]:
    return {
        "database_url": url,
        "kafka_bootstrap_servers": broker.bootstrap,
        "topic_prefix": prefix,
        "log_json": False,
        "sweeps_enabled": False,
        "kafka_consumer_batch_timeout_ms": 50,
        **kw,
    }


class Stack:
    """The offers app under test with its peers; `offers`, `seg`, `notifier` are HTTP clients."""

    def __init__(self) -> None:
        self.offers: httpx.AsyncClient
        self.seg: httpx.AsyncClient
        self.notifier: httpx.AsyncClient
        self.sm: Any
        self.bootstrap = ""
        self.prefix = ""

    async def publish(self, topic: str, messages: list[dict[str, Any]]) -> None:
        await publish(self.bootstrap, self.prefix + topic, messages)

    async def sweep(self, name: str) -> dict[str, Any]:
        r = await self.offers.post(f"/v1/ops/sweeps/{name}")
        assert r.status_code == 200, r.text
        return r.json()["result"]  # type: ignore[no-any-return]

    async def sql(self, query: str, **params: Any) -> list[dict[str, Any]]:
        async with self.sm() as s:
            return [dict(r) for r in (await s.execute(text(query), params)).mappings()]

    async def outbox_messages(self) -> list[dict[str, Any]]:
        rows = await self.sql("SELECT value FROM outbox ORDER BY id")
        return [serde.loads(bytes(r["value"])) for r in rows]

    async def templates(self, key: str, *channels: str, **kw: Any) -> None:
        for channel in channels or ("email", "sms", "push"):
            r = await self.notifier.post("/v1/templates", json=template(key, channel, **kw))
            assert r.status_code == 201, r.text

    async def decisions(self, campaign_id: str | None = None) -> dict[str, str]:
        """customer -> outcome (the latest decision) of one campaign, or of all."""
        where = "WHERE campaign_id = :c" if campaign_id else ""
        rows = await self.sql(f"SELECT customer_id, outcome FROM decisions {where} ORDER BY id", c=campaign_id)
        return {r["customer_id"]: r["outcome"] for r in rows}

    async def wait_decisions(self, count: int, campaign_id: str | None = None, timeout: float = 30) -> dict[str, str]:
        where = "WHERE campaign_id = :c" if campaign_id else ""

        async def enough() -> dict[str, str] | None:
            n = (await self.sql(f"SELECT count(*) AS n FROM decisions {where}", c=campaign_id))[0]["n"]
            return await self.decisions(campaign_id) if n >= count else None

        return await eventually(enough, timeout=timeout, what=f"{count} decisions")  # type: ignore[no-any-return]

    async def requested(self, campaign_id: str | None = None) -> list[dict[str, Any]]:
        """The message requests offers published on crm.messages.v1 (read back from the broker)."""
        msgs = await read_topic(self.bootstrap, self.prefix + TOPIC_MESSAGES, timeout=5)
        return [m for m in msgs if campaign_id is None or m.get("campaign_id") == campaign_id]

    async def create(self, body: dict[str, Any], *, activate: bool = True) -> dict[str, Any]:
        r = await self.offers.post("/v1/campaigns", json=body)
        assert r.status_code == 201, r.text
        campaign = r.json()
        if activate:
            r = await self.offers.post(f"/v1/campaigns/{campaign['id']}/activate")
            assert r.status_code == 200, r.text
            campaign = r.json()
        return campaign  # type: ignore[no-any-return]


@pytest_asyncio.fixture(loop_scope="session")
async def make_stack(make_database, broker, topic_prefix, clock) -> AsyncIterator[Callable[..., Any]]:
    """`async with make_stack(peer_consumers=False, relay=False, **offers_settings) as stack`."""

    @asynccontextmanager
    async def _make(
        *,
        peer_consumers: bool = False,
        notifier_kw: dict[str, Any] | None = None,
        segmentation_url: str | None = None,
        **offers_kw: Any,
    ) -> AsyncIterator[Stack]:
        seg = segmentation_app(
            SegmentationSettings(
                **stack_settings(
                    await make_database("segmentation"), broker, topic_prefix, consumers_enabled=peer_consumers
                )
            ),
            clock=clock,
        )
        note = notifier_app(
            NotifierSettings(
                **stack_settings(
                    await make_database("notifier"),
                    broker,
                    topic_prefix,
                    consumers_enabled=peer_consumers,
                    dispatcher_enabled=peer_consumers,
                    public_base_url="http://test",
                    dispatch_poll_interval_s=0.1,
                    **(notifier_kw or {}),
                )
            ),
            clock=clock,
        )
        offers_url = await make_database("offers")
        async with serve_app(seg) as seg_url, serve_app(note) as note_url:
            settings = Settings(
                **stack_settings(
                    offers_url,
                    broker,
                    topic_prefix,
                    segmentation_url=segmentation_url or seg_url,
                    notifier_url=note_url,
                    campaign_cache_ttl_s=0.0,
                    **offers_kw,
                )
            )
            engine = create_engine(offers_url, pool_size=3)
            stack = Stack()
            stack.sm = create_sessionmaker(engine)
            stack.bootstrap = broker.bootstrap
            stack.prefix = topic_prefix
            async with (
                run_app(offers_app(settings, clock=clock)) as offers,
                httpx.AsyncClient(base_url=seg_url, headers=TEST_AUTH, timeout=30) as seg_client,
                httpx.AsyncClient(base_url=note_url, headers=TEST_AUTH, timeout=30) as note_client,
            ):
                stack.offers, stack.seg, stack.notifier = offers, seg_client, note_client
                try:
                    yield stack
                finally:
                    await engine.dispose()

    yield _make
