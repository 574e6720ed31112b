"""Database plumbing: declarative base with a naming convention, engines, session scope, inbox/outbox tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import asyncpg
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def service_metadata() -> MetaData:
    """A service's metadata: the naming convention, and the runtime's inbox and outbox tables in it.

    A service declares its base with it, so its models and the migrations describe the same schema
    (`testing.schema_drift`): `class Base(DeclarativeBase): metadata = service_metadata()`.
    """
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # A message id a consumer has applied; written in the same transaction as its effects.
    Table(
        "inbox",
        metadata,
        Column("consumer", String(200), primary_key=True),
        Column("message_id", String(300), primary_key=True),
        Column("processed_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
        Index("ix_inbox_processed_at", "processed_at"),
    )
    # A message to publish, written in the business transaction; the relay sends it and sets `sent_at`
    # (kept for outbox_retention_s, so it can be republished; crm_common.outbox).
    Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=False), primary_key=True),
        Column("topic", String(200), nullable=False),
        Column("key", Text, nullable=False),
        Column("value", LargeBinary, nullable=False),
        Column("headers", JSONB, nullable=True),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Index("ix_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL")),
    )
    return metadata


def make_base() -> type[DeclarativeBase]:
    """A declarative base on `service_metadata()` (a class statement is better: type checkers see it)."""

    class ServiceBase(DeclarativeBase):
        metadata = service_metadata()

    return ServiceBase


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    command_timeout_s: float = 600,
    plan_cache_mode: str = "auto",
) -> AsyncEngine:
    """`plan_cache_mode`: PostgreSQL's, for the prepared statements of the connections. A generic plan made
    while a table was nearly empty can keep a sequential scan as the table grows: notifier's cap count took
    142 ms a call at 40,000 messages with it, 13 ms with custom plans (pg_stat_statements, bench/pipeline.py),
    so notifier plans every call, and so does offers (its decision statement's generic plan scanned
    `decisions` once per candidate: p99 7.1 s against 0.98 s at 1,000 events/s). Elsewhere custom plans
    were no better (segmentation's profile read was slower), so the default is PostgreSQL's own."""
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip per checkout. A connection that died with the server
        # fails its statement instead; callers treat that as transient (consumers retry the batch,
        # routes answer 503) and the pool discards the connection.
        pool_pre_ping=False,
        pool_recycle=1800,
        pool_timeout=10,
        echo=echo,
        connect_args={
            "timeout": 5,
            "command_timeout": command_timeout_s,
            "server_settings": {"application_name": "crm", "plan_cache_mode": plan_cache_mode},
        },
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def session_scope(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """Open a session, commit when the block ends cleanly, roll back otherwise."""
    async with sessionmaker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            # Roll back explicitly so a connection is never returned to the pool mid-transaction.
            await session.rollback()
            raise


async def driver_connection(session: AsyncSession) -> asyncpg.Connection:
    """The session's own asyncpg connection, inside its transaction when one is open: for hot
    paths that skip SQLAlchemy's statement handling (prepared statements, COPY)."""
    raw = await (await session.connection()).get_raw_connection()
    conn = raw.driver_connection
    assert conn is not None
    return cast("asyncpg.Connection", conn)
