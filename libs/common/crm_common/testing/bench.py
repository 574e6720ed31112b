"""Pieces the benchmarks under bench/ share: filling a topic, the raw-consume ceiling, a relay worker."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common import serde
from crm_common.consumer import Record
from crm_common.outbox import OutboxRelay
from crm_common.worker import Worker


async def publish_events(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Publish event messages keyed by customer_id and wait for every ack."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=serde.dumps(e), key=e["customer_id"].encode()) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_insert(session: Any, records: list[Record]) -> None:
    """The ceiling's handler: one multi-row insert of the batch into `raw_events`, nothing else."""
    await session.execute(
        text(
            "INSERT INTO raw_events (id, customer_id, body) SELECT * FROM unnest(CAST(:i AS text[]), "
            "CAST(:c AS text[]), CAST(:b AS jsonb[]))"
        ),
        {
            "i": [r.id for r in records],
            "c": [r.value.get("customer_id") for r in records],
            "b": [serde.dumps(r.value).decode() for r in records],
        },
    )


def relay_worker(name: str, sessionmaker: async_sessionmaker[AsyncSession], producer: AIOKafkaProducer) -> Worker:
    """The outbox relay as the runtime runs it, on a short timer instead of NOTIFY (not started)."""
    publisher = OutboxRelay(name=name, sessionmaker=sessionmaker, producer=producer)
    return Worker(f"relay:{name}", publisher.run_once, interval_s=0.05, full_batch=1000, drain_on_stop=True)
