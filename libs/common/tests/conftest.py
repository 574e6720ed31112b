from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common.db import create_engine, create_sessionmaker, make_base

Base = make_base()


@pytest_asyncio.fixture(loop_scope="session")
async def db(make_database: Callable[..., Any]) -> AsyncIterator[tuple[str, async_sessionmaker[AsyncSession]]]:
    """A fresh database with the runtime tables and an `effects` table that records every apply."""
    url = await make_database()
    engine = create_engine(url, pool_size=5)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(text("CREATE TABLE effects (message_id text NOT NULL, value int NOT NULL)"))
    yield url, create_sessionmaker(engine)
    await engine.dispose()


async def effect_counts(sm: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with sm() as s:
        rows = (await s.execute(text("SELECT message_id, count(*) FROM effects GROUP BY message_id"))).all()
    return {r[0]: r[1] for r in rows}
