"""The consume loop against the real broker and PostgreSQL: inbox, retries, DLQ, crashes, rebalances."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.consumer import ConsumerRunner, PoisonMessage, Record
from crm_common.kafka import make_producer
from crm_common.testing.helpers import eventually, publish, read_topic

from .conftest import effect_counts


async def record_effects(session: AsyncSession, records: list[Record]) -> None:
    await session.execute(
        text(
            "INSERT INTO effects (message_id, value) SELECT unnest(CAST(:ids AS text[])), unnest(CAST(:vals AS int[]))"
        ),
        {"ids": [r.id for r in records], "vals": [int(r.value["n"]) for r in records]},
    )


def messages(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"m{i}", "customer_id": f"c{i % 7}", "n": i} for i in range(start, start + n)]


async def _runner(
    broker, topic_prefix, sm, handler, name="test-consumer", producer=None, **kw
) -> tuple[ConsumerRunner, AIOKafkaProducer]:
    producer = producer or make_producer(broker.bootstrap)
    await producer.start()
    runner = ConsumerRunner(
        name=name,
        topics=[topic_prefix + "crm.events.v1"],
        handler=handler,
        sessionmaker=sm,
        bootstrap_servers=broker.bootstrap,
        producer=producer,
        dlq_topic=topic_prefix + "crm.dlq.v1",
        group_id=topic_prefix + name,
        batch_max=kw.pop("batch_max", 100),
        retry_backoff_ms=10,
        **kw,
    )
    await runner.start()
    return runner, producer


async def test_redelivered_messages_apply_once(broker, topic_prefix, db):
    _, sm = db
    topic = topic_prefix + "crm.events.v1"
    await publish(broker.bootstrap, topic, messages(50))
    await publish(broker.bootstrap, topic, messages(50))  # every message twice
    runner, producer = await _runner(broker, topic_prefix, sm, record_effects)
    try:
        await eventually(lambda: runner.stats.applied + runner.stats.duplicates >= 100, what="all consumed")
        counts = await effect_counts(sm)
        assert len(counts) == 50 and set(counts.values()) == {1}
        assert runner.stats.duplicates == 50
        assert await runner.lag() == 0
    finally:
        await runner.stop()
        await producer.stop()


async def test_transient_failure_gets_the_same_batch_again(broker, topic_prefix, db):
    """After a failed batch, getmany would go on from the fetch position (aiokafka #1046); we seek back."""
    _, sm = db
    seen: list[list[str]] = []
    failures = {"left": 2}

    async def flaky(session: AsyncSession, records: list[Record]) -> None:
        seen.append([r.id for r in records])
        await record_effects(session, records)
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("database went away")

    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(30))
    runner, producer = await _runner(broker, topic_prefix, sm, flaky)
    try:
        await eventually(lambda: runner.stats.applied >= 30, what="all applied after retries")
        counts = await effect_counts(sm)
        assert sorted(counts) == sorted(f"m{i}" for i in range(30))
        assert set(counts.values()) == {1}, "an effect was doubled"
        assert runner.stats.retries == 2
        # The failed batch came back: its first message was offered more than once.
        assert sum(1 for batch in seen if seen[0][0] in batch) >= 2
    finally:
        await runner.stop()
        await producer.stop()


async def test_poison_message_goes_to_dlq_and_rest_of_batch_applies_once(broker, topic_prefix, db):
    _, sm = db

    async def picky(session: AsyncSession, records: list[Record]) -> None:
        for r in records:
            if r.value.get("poison"):
                raise ValueError(f"cannot apply {r.id}")
        await record_effects(session, records)

    msgs = messages(20)
    msgs[7]["poison"] = True
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", msgs)
    # And one message that is not even JSON with an id.
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", [{"customer_id": "c1", "no_id": True}])
    runner, producer = await _runner(broker, topic_prefix, sm, picky, max_retries=1)
    try:
        await eventually(lambda: runner.stats.applied >= 19 and runner.stats.dead_lettered >= 2, what="applied + DLQ")
        counts = await effect_counts(sm)
        assert "m7" not in counts
        assert len(counts) == 19 and set(counts.values()) == {1}
        dlq = await read_topic(broker.bootstrap, topic_prefix + "crm.dlq.v1", min_count=2)
        by_msg = {d.get("message_id"): d for d in dlq}
        assert "ValueError: cannot apply m7" in by_msg["m7"]["error"]
        assert by_msg["m7"]["source_topic"] == topic_prefix + "crm.events.v1"
        assert isinstance(by_msg["m7"]["offset"], int) and isinstance(by_msg["m7"]["partition"], int)
        assert by_msg[None]["error"] == "message has no string 'id'"
        assert await runner.lag() == 0
    finally:
        await runner.stop()
        await producer.stop()


async def test_poison_raised_explicitly_is_not_retried(broker, topic_prefix, db):
    _, sm = db
    calls = {"m3": 0}

    async def handler(session: AsyncSession, records: list[Record]) -> None:
        for r in records:
            if r.id == "m3":
                calls["m3"] += 1
                raise PoisonMessage("bad shape")
        await record_effects(session, records)

    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(5))
    runner, producer = await _runner(broker, topic_prefix, sm, handler, max_retries=5)
    try:
        await eventually(lambda: runner.stats.dead_lettered == 1 and runner.stats.applied == 4)
        assert calls["m3"] == 2  # once in the batch, once alone; never retried
    finally:
        await runner.stop()
        await producer.stop()


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from sqlalchemy import text
    from crm_common.consumer import ConsumerRunner
    from crm_common.db import create_engine, create_sessionmaker
    from crm_common.kafka import make_producer

    url, bootstrap, prefix = sys.argv[1:4]

    async def slow(session, records):
        await session.execute(
            text("INSERT INTO effects (message_id, value) SELECT unnest(CAST(:ids AS text[])), 0"),
            {"ids": [r.id for r in records]},
        )
        print("batch", flush=True)
        await asyncio.sleep(0.3)  # long enough to be killed mid-batch

    async def main():
        sm = create_sessionmaker(create_engine(url))
        producer = make_producer(bootstrap)
        await producer.start()
        runner = ConsumerRunner(name="crash", topics=[prefix + "crm.events.v1"], handler=slow, sessionmaker=sm,
                                bootstrap_servers=bootstrap, producer=producer, dlq_topic=prefix + "crm.dlq.v1",
                                group_id=prefix + "crash", batch_max=20,
                                session_timeout_ms=3000)
        await runner.start()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_consumer_killed_mid_batch_loses_and_doubles_nothing(broker, topic_prefix, db, tmp_path):
    url, sm = db
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(200))
    script = tmp_path / "crash_consumer.py"
    script.write_text(CRASH_SCRIPT)
    for _round in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(script), url, broker.bootstrap, topic_prefix],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        # Wait for a few batches, then kill -9 in the middle of one.
        assert proc.stdout is not None
        for _ in range(2):
            await asyncio.to_thread(proc.stdout.readline)
        await asyncio.sleep(0.15)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # A last, clean run finishes the job.
    proc = subprocess.Popen(
        [sys.executable, str(script), url, broker.bootstrap, topic_prefix],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await eventually(lambda: _count_distinct(sm, 200), timeout=60, what="all 200 applied")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    counts = await effect_counts(sm)
    assert len(counts) == 200
    assert set(counts.values()) == {1}, "an effect was applied twice"


async def _count_distinct(sm, n: int) -> bool:
    return len(await effect_counts(sm)) >= n


async def test_rebalance_during_processing_loses_and_doubles_nothing(broker, topic_prefix, db):
    _, sm = db

    async def slowish(session: AsyncSession, records: list[Record]) -> None:
        await record_effects(session, records)
        await asyncio.sleep(0.05)

    # Enough work (at least 60 batches of 50 ms) that the first member is still busy when the
    # second one joins, even on a slow machine; the join is seen on the assignment, not on a batch
    # (the second member may get only partitions the first has drained).
    total = 1200
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(total))
    first, p1 = await _runner(broker, topic_prefix, sm, slowish, name="group", batch_max=20)
    await eventually(lambda: first.stats.applied > 40, what="first member busy")
    second, p2 = await _runner(broker, topic_prefix, sm, slowish, name="group", batch_max=20)
    await eventually(
        lambda: second.consumer is not None and bool(second.consumer.assignment()),
        timeout=60,
        what="second member got partitions",
    )
    assert first.stats.applied < total, "the first member finished before the rebalance: nothing was tested"
    third, p3 = await _runner(broker, topic_prefix, sm, slowish, name="group", batch_max=20)
    await asyncio.sleep(1)
    await second.stop()  # leave during processing: another rebalance
    try:
        await eventually(lambda: _count_distinct(sm, total), timeout=120, what=f"all {total} applied")
        counts = await effect_counts(sm)
        assert len(counts) == total and set(counts.values()) == {1}
    finally:
        for r in (first, third):
            await r.stop()
        for p in (p1, p2, p3):
            await p.stop()


async def test_one_member_for_two_topics_routes_each_topic_and_keeps_their_old_inbox_names(broker, topic_prefix, db):
    """Merging two consumers into one re-applies nothing the old ones applied (their inbox names)."""
    from crm_common.service import route_by_topic

    _, sm = db
    events, segments = topic_prefix + "crm.events.v1", topic_prefix + "crm.segments.v1"
    async with sm() as s:
        await s.execute(
            text("INSERT INTO inbox (consumer, message_id) VALUES ('old-events', 'm0'), ('old-segments', 's0')")
        )
        await s.commit()
    await publish(broker.bootstrap, events, messages(3))
    await publish(broker.bootstrap, segments, [{"id": f"s{i}", "customer_id": "c1", "n": 100 + i} for i in range(3)])
    seen: dict[str, list[str]] = {"events": [], "segments": []}

    async def on_events(session: AsyncSession, records: list[Record]) -> None:
        assert {r.topic for r in records} == {events}
        seen["events"] += [r.id for r in records]
        await record_effects(session, records)

    async def on_segments(session: AsyncSession, records: list[Record]) -> None:
        assert {r.topic for r in records} == {segments}
        seen["segments"] += [r.id for r in records]
        await record_effects(session, records)

    producer = make_producer(broker.bootstrap)
    await producer.start()
    runner = ConsumerRunner(
        name="merged",
        topics=[events, segments],
        handler=route_by_topic({events: on_events, segments: on_segments}),
        sessionmaker=sm,
        bootstrap_servers=broker.bootstrap,
        producer=producer,
        dlq_topic=topic_prefix + "crm.dlq.v1",
        group_id=topic_prefix + "merged",
        inbox_names={events: "old-events", segments: "old-segments"},
    )
    await runner.start()
    try:
        await eventually(lambda: runner.stats.applied + runner.stats.duplicates >= 6, what="both topics consumed")
        assert sorted(seen["events"]) == ["m1", "m2"] and sorted(seen["segments"]) == ["s1", "s2"]
        assert runner.stats.duplicates == 2
        async with sm() as s:
            rows = set((await s.execute(text("SELECT consumer, message_id FROM inbox"))).all())
        assert {("old-events", "m1"), ("old-segments", "s2")} <= rows
        assert not any(c == topic_prefix + "merged" for c, _ in rows)
    finally:
        await runner.stop()
        await producer.stop()
