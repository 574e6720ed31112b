"""Models against migrations: the differences Alembic's autogenerate would write for a migrated database."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine


async def schema_drift(database_url: str, metadata: MetaData) -> list[Any]:
    """What differs between `metadata` (the service's models) and the schema at `database_url`.

    An empty list means the models and the migrations describe the same tables, columns, types,
    nullability, indexes and constraints; a test per service asserts it, so they cannot drift.
    """
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn: Any) -> list[Any]:
                context = MigrationContext.configure(
                    sync_conn, opts={"compare_type": True, "compare_server_default": False}
                )
                return list(compare_metadata(context, metadata))

            return await conn.run_sync(compare)
    finally:
        await engine.dispose()
