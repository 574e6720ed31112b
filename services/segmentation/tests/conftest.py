from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common.db import create_engine, create_sessionmaker


@pytest_asyncio.fixture(loop_scope="session")
async def db(
    make_database: Callable[..., Any],
) -> AsyncIterator[tuple[str, async_sessionmaker[AsyncSession]]]:
    """A fresh, migrated segmentation database and a session maker on it."""
    url = await make_database("segmentation")
    engine = create_engine(url, pool_size=3)
    yield url, create_sessionmaker(engine)
    await engine.dispose()


async def fetch_all(sm: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> list[dict[str, Any]]:
    async with sm() as s:
        return [dict(r) for r in (await s.execute(text(sql), params)).mappings()]
