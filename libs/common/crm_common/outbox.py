"""Transactional outbox: write messages with the business change, a relay publishes them in order."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from crm_common import metrics, serde
from crm_common.contract.messages import DeliveryEvent, LoyaltyEvent, MessageRequested, SegmentMembershipChanged
from crm_common.kafka import send_batched
from crm_common.notify import OUTBOX_CHANNEL
from crm_common.retention import delete_in_batches
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
    for message in messages:
        if not isinstance(message, model):
            raise TypeError(f"{topic} carries {model.__name__}, not {type(message).__name__}")
        if not message.id:
            raise ValueError("an outbox message needs a stable 'id'")
    # Serialised by the model itself, in one pass: model_dump then orjson cost twice as much (loyalty publishes
    # one message per accrual, so this is on its hot path).
    await _insert(session, [(topic, m.customer_id, m.model_dump_json().encode()) for m in messages])


async def enqueue_select(session: AsyncSession, select_sql: str, params: dict[str, Any], *, ctes: str = "") -> int:
    """Add the rows of a set-based `SELECT topic, key, value` to the outbox; return how many.

    For sweeps and recomputes that publish thousands of messages in one statement, where building
    each one in Python would cost more than the work itself. `value` must be the JSON (bytea) of
    the topic's contract model; each service pins that with a test that reads the rows back and
    validates them against TOPIC_MODELS. `ctes`: common table expressions the select reads
    (`a AS (...), b AS (...)`), written before the insert.
    """
    head = f"WITH {ctes}, " if ctes else "WITH "
    result = await session.execute(
        text(
            f"{head}ins AS (INSERT INTO outbox (topic, key, value) {select_sql} RETURNING 1)"
            f" SELECT n, CASE WHEN n > 0 THEN pg_notify('{OUTBOX_CHANNEL}', '') END"
            " FROM (SELECT count(*) AS n FROM ins) c"
        ),
        params,
    )
    count = int(result.scalar_one())
    if count:
        mark_outbox_written(session)
    return count


async def enqueue(session: AsyncSession, topic: str, key: str, value: dict[str, Any]) -> None:
    """Add one message to the outbox in the caller's transaction; `value` must carry a stable `id`."""
    await enqueue_many(session, [(topic, key, value)])


async def enqueue_many(session: AsyncSession, messages: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
    """Add messages to the outbox in the caller's transaction with one statement."""
    for _, _, value in messages:
        if not value.get("id"):
            raise ValueError("an outbox message needs a stable 'id'")
    await _insert(session, [(topic, key, serde.dumps(value)) for topic, key, value in messages])


async def _insert(session: AsyncSession, rows: Sequence[tuple[str, str, bytes]]) -> None:
    if not rows:
        return
    mark_outbox_written(session)
    # NOTIFY travels with the transaction: the relays of every process hear of the rows at commit.
    await session.execute(
        text(
            "WITH ins AS (INSERT INTO outbox (topic, key, value) "
            "SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:keys AS text[]), CAST(:values AS bytea[])))"
            f" SELECT pg_notify('{OUTBOX_CHANNEL}', '')"
        ),
        {"topics": [r[0] for r in rows], "keys": [r[1] for r in rows], "values": [r[2] for r in rows]},
    )


class TopicMissing(RuntimeError):
    """The broker does not list a topic the relay is about to publish to (yet)."""


class OutboxQueue:
    """Where a relay reads what to publish: the `outbox` table (every service's default).

    A subclass points the relay at another queue table with the same contract: `fetch` returns
    an acknowledgement token and the (topic, key, value) rows in publication order, `ack` marks
    them sent in the relay's transaction, `backlog_sql` counts what waits.

    The outbox keeps sent rows for `retention_s` (`sent_at` set by the ack, the fetch reads the
    unsent ones through a partial index), so that `republish` can mark them unsent again after a
    broker lost its data; with 0 the ack deletes them as before. `republishable` says whether the
    queue can do that (ingest's archive queue replays instead).
    """

    republishable = True
    fetch_sql = "SELECT id, topic, key, value FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT :limit"
    ack_sql = "UPDATE outbox SET sent_at = now() WHERE id = ANY(CAST(:ids AS bigint[]))"
    delete_sql = "DELETE FROM outbox WHERE id = ANY(CAST(:ids AS bigint[]))"
    backlog_sql = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
    # Oldest first along the primary key (rows are sent in id order), so a batch stops early.
    _sweep_sql = text(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < :before ORDER BY id LIMIT :limit)"
    )
    _republish_sql = text(
        "WITH r AS (UPDATE outbox SET sent_at = NULL WHERE sent_at >= :since RETURNING 1)"
        f" SELECT n, CASE WHEN n > 0 THEN pg_notify('{OUTBOX_CHANNEL}', '') END FROM (SELECT count(*) AS n FROM r) c"
    )

    def __init__(self, retention_s: float = 0) -> None:
        self.retention_s = retention_s

    @property
    def keeps_sent(self) -> bool:
        """Whether sent rows stay for a window, so that `republish` can reach them."""
        return self.republishable and self.retention_s > 0

    async def fetch(self, session: AsyncSession, limit: int) -> tuple[Any, list[tuple[str, str, bytes]]]:
        rows = (await session.execute(text(self.fetch_sql), {"limit": limit})).all()
        return [r.id for r in rows], [(r.topic, r.key, bytes(r.value)) for r in rows]

    async def ack(self, session: AsyncSession, token: Any) -> None:
        await session.execute(text(self.ack_sql if self.retention_s > 0 else self.delete_sql), {"ids": token})

    async def delete_sent_before(self, conn: AsyncConnection, before: datetime, limit: int) -> int:
        """Delete at most `limit` rows sent before `before` (one batch of the retention sweep)."""
        result = await conn.execute(self._sweep_sql, {"before": before, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def republish(self, session: AsyncSession, since: datetime) -> int:
        """Mark the rows sent at or after `since` unsent again (the relay sends them in id order); how many."""
        return int((await session.execute(self._republish_sql, {"since": since})).scalar_one())


class OutboxRelay:
    """Publish a queue's rows in order; one relay per database at a time (advisory lock).

    Run by a runtime worker (`ServiceRuntime.add_relay`), woken by the commits that enqueue.
    Messages go out as per-partition record batches (`send_batched`). After a failure, and at
    start, the relay first checks that the broker lists every topic of the batch: a broker that
    came back empty would otherwise auto-create them on the first send (the embedded one
    acknowledges such sends and loses them) instead of waiting for them to be created properly.
    """

    def __init__(
        self,
        *,
        name: str,
        sessionmaker: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        batch_size: int = 1000,
        topic_prefix: str = "",
        send_timeout_s: float = 30,
        queue: OutboxQueue | None = None,
    ) -> None:
        self.name = name
        self.sessionmaker = sessionmaker
        self.producer = producer
        self.batch_size = batch_size
        self.topic_prefix = topic_prefix
        self.send_timeout_s = send_timeout_s
        self.queue = queue or OutboxQueue()
        self.lock_key = zlib.crc32(f"outbox:{name}".encode())
        self.published = 0
        # True at start and after a failed pass, until a pass succeeds.
        self.failing = True
        self._known_topics: set[str] = set()

    async def run_once(self) -> int:
        """Publish one batch; return how many messages went out."""
        try:
            sent = await self._publish_batch()
        except Exception:
            self.failing = True
            raise
        self.failing = False
        return sent

    async def _publish_batch(self) -> int:
        async with self.sessionmaker() as session:
            locked = (
                await session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": self.lock_key})
            ).scalar()
            if not locked:
                return 0
            token, rows = await self.queue.fetch(session, self.batch_size)
            if not rows:
                await session.rollback()
                return 0
            messages = [(self.topic_prefix + topic, key.encode(), value) for topic, key, value in rows]
            if self.failing:
                await self._require_topics({m[0] for m in messages})
            # Sent before the ack commits: a crash in between republishes, and consumers dedupe by id.
            await asyncio.wait_for(send_batched(self.producer, messages), self.send_timeout_s)
            await self.queue.ack(session, token)
            await session.commit()
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.labels(self.name).inc(len(rows))
        return len(rows)

    async def _require_topics(self, topics: set[str]) -> None:
        metadata = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.send_timeout_s)
        missing = sorted(topics - set(metadata.topics()))
        if missing:
            raise TopicMissing(f"topics {missing} do not exist on the broker")

    async def backlog(self, sessionmaker: async_sessionmaker[AsyncSession] | None = None) -> int:
        """Rows waiting; `sessionmaker`: the caller's, when the relay's own lives on another loop."""
        async with (sessionmaker or self.sessionmaker)() as session:
            return int((await session.execute(text(self.queue.backlog_sql))).scalar() or 0)


OUTBOX_SWEEP = "outbox_retention"


def outbox_horizon(retention_s: float, now: datetime) -> datetime:
    """The oldest send time the outbox still keeps (and `republish` can reach)."""
    return now - timedelta(seconds=retention_s)


def outbox_sweep(queue: OutboxQueue, batch_size: int) -> Callable[[AsyncSession, datetime], Awaitable[int]]:
    """The periodic sweep deleting outbox rows sent before the retention window, in batches."""

    async def sweep(session: AsyncSession, now: datetime) -> int:
        before = outbox_horizon(queue.retention_s, now)

        async def step(conn: AsyncConnection, limit: int) -> int:
            return await queue.delete_sent_before(conn, before, limit)

        return await delete_in_batches(session=session, step=step, batch_size=batch_size)

    return sweep
