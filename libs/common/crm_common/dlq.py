"""Reading back the dead letters of a service's consumers from `crm.dlq.v1`, for `/v1/ops/dlq`.

The DLQ is a topic, not a table: the consume loop publishes each entry there with its error and
origin (`crm_common.consumer`). An operator wants the latest entries and why each failed, so the
route reads the tail of every partition without a consumer group (nothing is committed, nothing
is taken away from whoever else reads the topic).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from crm_common import serde

# What an entry shows; the failed message's value and the traceback stay on the topic.
FIELDS = ("id", "consumer", "source_topic", "partition", "offset", "message_id", "error", "failed_at")


async def read_dead_letters(
    bootstrap: str, topic: str, *, consumers: Collection[str], limit: int = 50, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The latest `limit` entries of `topic` whose consumer is one of `consumers`, newest first.

    Reads at most `limit` records from the tail of each partition (entries of other services'
    consumers share the topic, so fewer may match), bounded by `timeout` seconds.
    """
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, request_timeout_ms=10_000
    )
    await client.start()
    try:
        partitions = client.partitions_for_topic(topic)
        if not partitions:
            await client._client.force_metadata_update()
            partitions = client.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        client.assign(tps)
        ends = await client.end_offsets(tps)
        begins = await client.beginning_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > begins[tp]}
        for tp in pending:
            client.seek(tp, max(begins[tp], ends[tp] - limit))
        entries = await _read_until(client, pending, ends, consumers, timeout)
    finally:
        await client.stop()
    entries.sort(key=lambda e: (str(e.get("failed_at") or ""), e.get("offset") or 0), reverse=True)
    return entries[:limit]


async def _read_until(
    client: AIOKafkaConsumer,
    pending: set[TopicPartition],
    ends: dict[TopicPartition, int],
    consumers: Collection[str],
    timeout: float,
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        batch = await client.getmany(*pending, timeout_ms=200)
        for tp, records in batch.items():
            for record in records:
                if record.offset >= ends[tp]:
                    continue
                try:
                    value = serde.loads(record.value)
                except ValueError:
                    continue
                if isinstance(value, dict) and value.get("consumer") in consumers:
                    entries.append({k: value.get(k) for k in FIELDS})
        for tp in list(pending):
            if await client.position(tp) >= ends[tp]:
                pending.discard(tp)
        await asyncio.sleep(0)
    return entries
