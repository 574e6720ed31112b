"""Tables owned by the ingest service: API keys, the accepted-event archive and its publish queue."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crm_common.db import service_metadata


class Base(DeclarativeBase):
    metadata = service_metadata()


class ApiKey(Base):
    """An API key: only its SHA-256 hash is stored; it belongs to one source and carries scopes."""

    __tablename__ = "api_keys"
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(8))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    # Events per second; NULL means the service default (settings.default_rate_limit_per_s).
    rate_limit_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ArchivedEvent(Base):
    """An accepted event, kept `archive_retention_days`; `seq` orders publishing, (source, event_id) dedupes."""

    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    source: Mapped[str] = mapped_column(String(8))
    event_id: Mapped[str] = mapped_column(String(128))
    customer_key: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The EventMessage exactly as published on crm.events.v1 (orjson bytes).
    message: Mapped[bytes] = mapped_column(LargeBinary)
    __table_args__ = (
        UniqueConstraint("source", "event_id", name="uq_events_source_event_id"),
        Index("ix_events_received_at", "received_at", postgresql_using="brin"),
        Index("ix_events_occurred_at", "occurred_at", postgresql_using="brin"),
    )


class PendingBatch(Base):
    """Archived events waiting to be published: the events of one accepted batch (or one chunk of a
    replay), by their `seq`, in one row.

    No foreign key to events.seq: rows are only ever written from events' own rows, and checking
    every element of the array would cost the hot insert path.
    """

    __tablename__ = "event_pending_batches"
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)
    seqs: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    __table_args__ = (CheckConstraint("n = cardinality(seqs) AND n > 0", name="ck_event_pending_batches_n"),)
