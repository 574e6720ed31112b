"""The relay of the archive: publishes queued events to crm.events.v1 in archive order."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from sqlalchemy import text

from crm_common import metrics
from crm_common.outbox import OutboxRelay
from crm_common.settings import TOPIC_EVENTS


class TopicMissing(RuntimeError):
    """The broker does not list the events topic (yet)."""


async def send_batched(producer: AIOKafkaProducer, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> None:
    """Send (key, value) messages as per-partition record batches and wait for every ack.

    Same partitioning as the producer's default (murmur2 of the key), same order within a
    partition, but without the per-message future and metadata lookup of `producer.send`, which
    dominate the relay's cost at thousands of events per pass.
    """
    partitions = sorted(await producer.partitions_for(topic))
    count = len(partitions)
    partition_of: dict[bytes, int] = {}
    open_batches: dict[int, Any] = {}
    futures = []
    for key, value in messages:
        partition = partition_of.get(key)
        if partition is None:
            partition = partition_of[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % count]
        batch = open_batches.get(partition)
        if batch is None:
            batch = open_batches[partition] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = open_batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a message of {len(value)} bytes does not fit in a record batch")
    for partition, batch in open_batches.items():
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*futures)


class EventRelay(OutboxRelay):
    """The common outbox relay pattern, reading the event archive's publish queue.

    One relay at a time per database (advisory lock), in `seq` order, keyed by customer_id (or
    `anon:<anonymous_id>`); the value is the stored EventMessage, whose `id` is
    `<source>:<event_id>`, so a replay or a crash between send and ack is deduplicated downstream.
    """

    # The oldest queued batches holding up to :limit events (at least one batch), and their events.
    batches_sql = (
        "SELECT id FROM (SELECT id, sum(n) OVER (ORDER BY id) - n AS before"
        " FROM (SELECT id, n FROM event_pending_batches ORDER BY id LIMIT :limit) head) b"
        " WHERE before < :limit ORDER BY id"
    )
    fetch_sql = (
        "SELECT e.customer_key, e.message FROM event_pending_batches b"
        " CROSS JOIN LATERAL unnest(b.seqs) AS p(seq) JOIN events e ON e.seq = p.seq"
        " WHERE b.id = ANY(CAST(:ids AS bigint[])) ORDER BY p.seq"
    )
    ack_sql = "DELETE FROM event_pending_batches WHERE id = ANY(CAST(:ids AS bigint[]))"
    backlog_sql = "SELECT coalesce(sum(n), 0) FROM event_pending_batches"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.topic = self.topic_prefix + TOPIC_EVENTS
        # True at start and after a failed pass, until a pass succeeds.
        self.failing = True

    async def run_once(self) -> int:
        """Publish one batch of queued events; return how many went out."""
        # After a failure (and at start) check that the broker lists the topic before sending:
        # a broker that came back empty would otherwise auto-create it on the first send (the
        # embedded one acknowledges such sends and loses them), instead of waiting for the
        # topics to be created with their proper partitions.
        if self.failing:
            await self._require_topic()
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
            ids = (await session.execute(text(self.batches_sql), {"limit": self.batch_size})).scalars().all()
            if not ids:
                await session.rollback()
                return 0
            rows = (await session.execute(text(self.fetch_sql), {"ids": ids})).all()
            # Sent before the delete commits: a crash in between republishes, and consumers dedupe by id.
            await asyncio.wait_for(
                send_batched(self.producer, self.topic, [(r[0].encode(), bytes(r[1])) for r in rows]),
                self.send_timeout_s,
            )
            await session.execute(text(self.ack_sql), {"ids": ids})
            await session.commit()
        self.published += len(rows)
        metrics.OUTBOX_PUBLISHED.labels(self.name).inc(len(rows))
        return len(rows)

    async def _require_topic(self) -> None:
        metadata = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.send_timeout_s)
        if self.topic not in metadata.topics():
            raise TopicMissing(f"topic {self.topic} does not exist on the broker")
