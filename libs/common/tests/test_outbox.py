"""The outbox relay publishes what a committed transaction enqueued, in order, and nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from crm_common.kafka import make_producer
from crm_common.outbox import OutboxQueue, OutboxRelay, enqueue_many, outbox_sweep
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


async def test_relay_keeps_sent_rows_for_the_window_and_republish_sends_them_again(broker, topic_prefix, db):
    """With a retention window the ack marks rows sent; republish makes the relay send them again, in id order."""
    _, sm = db
    queue = OutboxQueue(retention_s=3600)
    async with sm() as s:
        await enqueue_many(s, [("crm.segments.v1", "c1", {"id": f"k{i}", "customer_id": "c1"}) for i in range(5)])
        await s.commit()
    producer = make_producer(broker.bootstrap)
    await producer.start()
    relay = OutboxRelay(name="t3", sessionmaker=sm, producer=producer, topic_prefix=topic_prefix, queue=queue)
    try:
        assert await relay.run_once() == 5
        assert await relay.run_once() == 0
        assert await relay.backlog() == 0
        async with sm() as s:
            sent = (await s.execute(text("SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"))).scalar()
            assert sent == 5
            since = (await s.execute(text("SELECT min(sent_at) FROM outbox"))).scalar()
            assert await queue.republish(s, since) == 5
            await s.commit()
        assert await relay.backlog() == 5
        assert await relay.run_once() == 5
        got = await read_topic(broker.bootstrap, topic_prefix + "crm.segments.v1", min_count=10)
        assert [m["id"] for m in got] == [f"k{i}" for i in range(5)] * 2
    finally:
        await producer.stop()


async def test_retention_sweep_deletes_only_rows_sent_before_the_window(db):
    _, sm = db
    queue = OutboxQueue(retention_s=60)
    async with sm() as s:
        await enqueue_many(s, [("crm.segments.v1", "c1", {"id": f"s{i}", "customer_id": "c1"}) for i in range(4)])
        await s.execute(
            text(
                "UPDATE outbox SET sent_at = CASE WHEN convert_from(value, 'UTF8') LIKE '%s0%' THEN now() - interval '2 minutes'"
                " WHEN convert_from(value, 'UTF8') LIKE '%s1%' THEN now() END WHERE true"
            )
        )
        await s.commit()
    async with sm() as s:
        now = (await s.execute(text("SELECT now()"))).scalar()
        assert await outbox_sweep(queue, batch_size=1)(s, now) == 1
        await s.commit()
    async with sm() as s:
        left = (await s.execute(text("SELECT count(*), count(sent_at) FROM outbox"))).one()
    # s0 (sent 2 minutes ago) went; s1 (sent now) and the two unsent rows stay.
    assert tuple(left) == (3, 1)


async def test_without_retention_the_ack_deletes_as_before(broker, topic_prefix, db):
    _, sm = db
    async with sm() as s:
        await enqueue_many(s, [("crm.segments.v1", "c1", {"id": "d1", "customer_id": "c1"})])
        await s.commit()
    producer = make_producer(broker.bootstrap)
    await producer.start()
    relay = OutboxRelay(name="t4", sessionmaker=sm, producer=producer, topic_prefix=topic_prefix)
    try:
        assert await relay.run_once() == 1
        async with sm() as s:
            assert (await s.execute(text("SELECT count(*) FROM outbox"))).scalar() == 0
    finally:
        await producer.stop()
