"""Kafka producer and topic helpers on aiokafka, tuned for the embedded Tansu broker and real Kafka."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from crm_common import serde
from crm_common.settings import ALL_TOPICS

log = logging.getLogger(__name__)


def make_producer(
    bootstrap_servers: str, *, enable_idempotence: bool = False, client_id: str = "crm"
) -> AIOKafkaProducer:
    """Build a producer that waits for all in-sync replicas; idempotence only where the broker has it."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=enable_idempotence,
        linger_ms=5,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
        request_timeout_ms=15_000,
        retry_backoff_ms=200,
    )


async def send_many(producer: AIOKafkaProducer, messages: Iterable[tuple[str, str, bytes]]) -> None:
    """Send (topic, key, value) messages and wait until the broker has acknowledged all of them."""
    futures = [await producer.send(topic, value=value, key=key.encode()) for topic, key, value in messages]
    if futures:
        await asyncio.gather(*futures)


async def send_json(producer: AIOKafkaProducer, topic: str, key: str, value: Any) -> None:
    await (await producer.send(topic, value=serde.dumps(value), key=key.encode()))


async def ensure_topics(
    bootstrap_servers: str, topics: Sequence[str] = ALL_TOPICS, *, partitions: int = 12, attempts: int = 30
) -> None:
    """Create the topics that do not exist yet; wait for the broker to come up first."""
    last: Exception | None = None
    for _ in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing
            ]
            if missing:
                await admin.create_topics(missing)
            return
        except (KafkaError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
    raise RuntimeError(f"could not create topics on {bootstrap_servers}: {last!r}")
