"""The outbox relay publishes what a committed transaction enqueued, in order, and nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from crm_common.kafka import make_producer
from crm_common.outbox import OutboxRelay, enqueue_many
from crm_common.testing.helpers import read_topic


async def test_relay_publishes_committed_messages_in_order_and_skips_rolled_back(broker, topic_prefix, db):
    _, sm = db
    async with sm() as s:
        await enqueue_many(
            s, [("crm.segments.v1", "c1", {"id": f"ok{i}", "customer_id": "c1", "n": i}) for i in range(10)]
        )
        await s.commit()
    async with sm() as s:
        await enqueue_many(s, [("crm.segments.v1", "c1", {"id": "rolled-back", "customer_id": "c1"})])
        await s.rollback()
    producer = make_producer(broker.bootstrap)
    await producer.start()
    relay = OutboxRelay(name="t", sessionmaker=sm, producer=producer, topic_prefix=topic_prefix)
    try:
        assert await relay.run_once() == 10
        assert await relay.run_once() == 0
        got = await read_topic(broker.bootstrap, topic_prefix + "crm.segments.v1", min_count=10)
        assert [m["id"] for m in got] == [f"ok{i}" for i in range(10)]
        async with sm() as s:
            assert (await s.execute(text("SELECT count(*) FROM outbox"))).scalar() == 0
    finally:
        await producer.stop()


async def test_relay_keeps_messages_while_broker_unreachable(broker, topic_prefix, db):
    _, sm = db
    async with sm() as s:
        await enqueue_many(s, [("crm.segments.v1", "c1", {"id": "x1", "customer_id": "c1"})])
        await s.commit()
    producer = make_producer("127.0.0.1:1")  # never connected: nothing listens there
    relay = OutboxRelay(name="t2", sessionmaker=sm, producer=producer, topic_prefix=topic_prefix, send_timeout_s=1)
    with pytest.raises(Exception):  # noqa: B017 - any failure to publish will do
        await relay.run_once()
    async with sm() as s:
        assert (await s.execute(text("SELECT count(*) FROM outbox"))).scalar() == 1
