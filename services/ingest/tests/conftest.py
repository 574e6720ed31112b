from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest_asyncio
from crm_common.auth import SCOPES
from crm_common.clock import ManualClock
from crm_common.db import create_engine, create_sessionmaker, session_scope
from crm_common.testing.helpers import run_app
from ingest.app import create_app
from ingest.keys import add_known_key
from ingest.settings import Settings
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

POS_KEY = "test-pos-key"


@dataclass
class Ingest:
    """An in-process ingest app on the test stack and what a test needs around it."""

    client: httpx.AsyncClient
    url: str
    sessionmaker: async_sessionmaker[AsyncSession]
    topic: str
    bootstrap: str
    clock: ManualClock
    app: Any

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {POS_KEY}"}

    async def post(self, body: Any, key: str = POS_KEY, **kw: Any) -> httpx.Response:
        return await self.client.post("/v1/events", json=body, headers={"Authorization": f"Bearer {key}"}, **kw)

    async def add_key(
        self, key: str, *, source: str = "pos", scopes: list[str] | None = None, rate: float | None = None
    ) -> None:
        async with session_scope(self.sessionmaker) as s:
            await add_known_key(
                session=s, key=key, name=key, source=source, scopes=scopes or list(SCOPES), rate_limit_per_s=rate
            )


def ingest_settings(url: str, bootstrap: str, topic_prefix: str, **kw: Any) -> Settings:
    return Settings(
        database_url=url,
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=topic_prefix,
        log_json=False,
        outbox_poll_interval_ms=50,
        **kw,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def ingest_db(make_database) -> AsyncIterator[tuple[str, async_sessionmaker[AsyncSession]]]:
    url = await make_database("ingest")
    engine = create_engine(url, pool_size=2)
    sm = create_sessionmaker(engine)
    async with session_scope(sm) as s:
        await add_known_key(session=s, key=POS_KEY, name="pos", source="pos", scopes=list(SCOPES))
    yield url, sm
    await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def ingest(ingest_db, broker, topic_prefix, clock) -> AsyncIterator[Ingest]:
    url, sm = ingest_db
    app = create_app(ingest_settings(url, broker.bootstrap, topic_prefix), clock=clock)
    async with run_app(app) as client:
        yield Ingest(client, url, sm, topic_prefix + "crm.events.v1", broker.bootstrap, clock, app)
