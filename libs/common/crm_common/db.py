"""Database plumbing: declarative base with a naming convention, engines, session scope, inbox/outbox tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_base() -> type[DeclarativeBase]:
    """Create a declarative base with its own metadata, inbox and outbox tables included."""

    class ServiceBase(DeclarativeBase):
        metadata = MetaData(naming_convention=NAMING_CONVENTION)

    class InboxMessage(ServiceBase):
        """A message id a consumer has applied; written in the same transaction as its effects."""

        __tablename__ = "inbox"
        consumer: Mapped[str] = mapped_column(String(200), primary_key=True)
        message_id: Mapped[str] = mapped_column(String(300), primary_key=True)
        processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
        __table_args__ = (Index("ix_inbox_processed_at", "processed_at"),)

    class OutboxMessage(ServiceBase):
        """A message to publish, written in the business transaction; the relay sends and deletes it."""

        __tablename__ = "outbox"
        id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
        topic: Mapped[str] = mapped_column(String(200))
        key: Mapped[str] = mapped_column(Text)
        value: Mapped[bytes] = mapped_column(LargeBinary)
        headers: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
        created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    ServiceBase.InboxMessage = InboxMessage  # type: ignore[attr-defined]
    ServiceBase.OutboxMessage = OutboxMessage  # type: ignore[attr-defined]
    return ServiceBase


def create_engine(
    database_url: str, *, pool_size: int = 10, echo: bool = False, command_timeout_s: float = 600
) -> AsyncEngine:
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
            "server_settings": {"application_name": "crm"},
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
