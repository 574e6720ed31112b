"""Transactional outbox: write messages with the business change, a relay publishes them in order."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common import metrics, serde
from crm_common.contract.messages import DeliveryEvent, LoyaltyEvent, MessageRequested, SegmentMembershipChanged
from crm_common.kafka import send_many
from crm_common.settings import TOPIC_DELIVERIES, TOPIC_LOYALTY, TOPIC_MESSAGES, TOPIC_SEGMENTS

# The contract model of every topic a service publishes through its outbox.
TOPIC_MODELS: dict[str, type[Any]] = {
    TOPIC_SEGMENTS: SegmentMembershipChanged,
    TOPIC_LOYALTY: LoyaltyEvent,
    TOPIC_MESSAGES: MessageRequested,
    TOPIC_DELIVERIES: DeliveryEvent,
}

log = logging.getLogger(__name__)


def mark_outbox_written(session: AsyncSession) -> None:
    """Note that this transaction wrote outbox rows, so the relay is woken right after its commit."""
    session.info["outbox_written"] = True


async def enqueue_models(session: AsyncSession, topic: str, messages: Sequence[Any]) -> None:
    """Add contract messages of `topic` to the outbox in the caller's transaction, keyed by customer_id.

    Every message a service publishes is born as its topic's contract model (TOPIC_MODELS), so
    what consumers read is what the contract says.
    """
    model = TOPIC_MODELS[topic]
    rows = []
    for message in messages:
        if not isinstance(message, model):
            raise TypeError(f"{topic} carries {model.__name__}, not {type(message).__name__}")
        rows.append((topic, message.customer_id, message.model_dump(mode="json", exclude_none=False)))
    await enqueue_many(session, rows)


async def enqueue_select(session: AsyncSession, select_sql: str, params: dict[str, Any], *, with_sql: str = "") -> int:
    """Add the rows of a set-based `SELECT topic, key, value` to the outbox; return how many.

    For sweeps and recomputes that publish thousands of messages in one statement, where building
    each one in Python would cost more than the work itself. `value` must be the JSON (bytea) of
    the topic's contract model; each service pins that with a test that reads the rows back and
    validates them against TOPIC_MODELS. `with_sql` is a `WITH ...` clause put before the INSERT,
    for messages that come out of common table expressions (data-modifying ones included) the
    SELECT reads from.
    """
    result = await session.execute(text(f"{with_sql} INSERT INTO outbox (topic, key, value) {select_sql}"), params)
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        mark_outbox_written(session)
    return count


async def enqueue(session: AsyncSession, topic: str, key: str, value: dict[str, Any]) -> None:
    """Add one message to the outbox in the caller's transaction; `value` must carry a stable `id`."""
    await enqueue_many(session, [(topic, key, value)])


async def enqueue_many(session: AsyncSession, messages: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
    """Add messages to the outbox in the caller's transaction with one statement."""
    if not messages:
        return
    mark_outbox_written(session)
    for _, _, value in messages:
        if not value.get("id"):
            raise ValueError("an outbox message needs a stable 'id'")
    await session.execute(
        text(
            "INSERT INTO outbox (topic, key, value) "
            "SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:keys AS text[]), CAST(:values AS bytea[]))"
        ),
        {
            "topics": [m[0] for m in messages],
            "keys": [m[1] for m in messages],
            "values": [serde.dumps(m[2]) for m in messages],
        },
    )


class OutboxRelay:
    """Publish outbox rows in id order; one relay per database at a time (advisory lock)."""

    fetch_sql = "SELECT id, topic, key, value FROM outbox ORDER BY id LIMIT :limit"
    ack_sql = "DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))"
    backlog_sql = "SELECT count(*) FROM outbox"

    def __init__(
        self,
        *,
        name: str,
        sessionmaker: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        poll_interval_ms: int = 50,
        batch_size: int = 1000,
        topic_prefix: str = "",
        send_timeout_s: float = 30,
    ) -> None:
        self.name = name
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.poll_interval = poll_interval_ms / 1000
        self.batch_size = batch_size
        self.topic_prefix = topic_prefix
        self.send_timeout_s = send_timeout_s
        self.lock_key = zlib.crc32(f"outbox:{name}".encode())
        self.published = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Ask for a pass now instead of at the next poll (called after a commit that enqueued)."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"relay:{self.name}")

    async def stop(self) -> None:
        """Publish what is waiting (bounded), then stop."""
        self._stopping.set()
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, 30)
            except TimeoutError:
                self._task.cancel()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                sent = await self.run_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                sent = 0
                delay = min(5.0, 0.1 * 2**failures)
                log.warning("relay %s: publish failed (%r); retrying in %.1f s", self.name, exc, delay)
                if self._stopping.is_set() and failures > 3:
                    return
                await asyncio.sleep(delay)
                continue
            if self._stopping.is_set() and sent == 0:
                return
            if sent >= self.batch_size:
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Publish one batch; return how many messages went out."""
        async with self.sessionmaker() as session:
            locked = (
                await session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self.lock_key})
            ).scalar()
            if not locked:
                return 0
            rows = (await session.execute(text(self.fetch_sql), {"limit": self.batch_size})).all()
            if not rows:
                await session.rollback()
                return 0
            # Sent before the delete commits: a crash in between republishes, and consumers dedupe by id.
            await asyncio.wait_for(
                send_many(self.producer, ((self.topic_prefix + r[1], r[2], bytes(r[3])) for r in rows)),
                self.send_timeout_s,
            )
            await session.execute(text(self.ack_sql), {"ids": [r[0] for r in rows]})
            await session.commit()
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.labels(self.name).inc(len(rows))
        return len(rows)

    async def backlog(self) -> int:
        async with self.sessionmaker() as session:
            return int((await session.execute(text(self.backlog_sql))).scalar() or 0)
