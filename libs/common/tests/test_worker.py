"""Workers: woken by commits (NOTIFY, also from other connections), timers only as a fallback,
backoff on failures without dying, a clean stop that drains when asked."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from crm_common.contract.messages import SegmentMembershipChanged
from crm_common.db import create_engine, create_sessionmaker
from crm_common.kafka import make_producer
from crm_common.notify import OUTBOX_CHANNEL, Listener, asyncpg_dsn
from crm_common.outbox import OutboxRelay, enqueue_models, enqueue_select
from crm_common.settings import TOPIC_SEGMENTS
from crm_common.testing.helpers import eventually, read_topic
from crm_common.worker import Worker


class Counter:
    def __init__(self, results: list[int | BaseException] | None = None) -> None:
        self.calls = 0
        self.results = list(results or [])
        self.called = asyncio.Event()

    async def run_once(self) -> int:
        self.calls += 1
        self.called.set()
        if self.results:
            result = self.results.pop(0)
            if isinstance(result, BaseException):
                raise result
            return result
        return 0


def _membership(i: int) -> SegmentMembershipChanged:
    return SegmentMembershipChanged(
        id=f"m{i}",
        customer_id=f"c{i}",
        occurred_at="2026-01-05T12:00:00Z",
        type="segment.entered",
        segment_id="s1",
        segment_key="wine_lovers",
    )


async def test_a_commit_on_another_connection_wakes_the_worker_at_once_and_a_rollback_does_not(db):
    url, _ = db
    counter = Counter()
    worker = Worker("w", counter.run_once, interval_s=60, channels=(OUTBOX_CHANNEL,), run_at_start=False)
    listener = Listener(url)
    listener.subscribe(OUTBOX_CHANNEL, worker.wake)
    worker.start()
    listener.start()
    other = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await eventually(lambda: counter.calls == 1, timeout=5, what="the wake-up after connecting")
        tx = other.transaction()
        await tx.start()
        await other.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        await tx.rollback()
        await asyncio.sleep(0.5)
        assert counter.calls == 1, "a rolled-back NOTIFY must not wake anyone"
        started = time.monotonic()
        async with other.transaction():
            await other.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        await eventually(lambda: counter.calls == 2, timeout=5, what="the wake-up by commit")
        assert time.monotonic() - started < 1, "woken by the commit, not by the 60 s timer"
    finally:
        await other.close()
        await listener.stop()
        await worker.stop()


async def test_listener_reconnects_after_its_connection_is_killed_and_wakes_everyone_once(db):
    url, _ = db
    counter = Counter()
    worker = Worker("w", counter.run_once, interval_s=60, run_at_start=False)
    listener = Listener(url)
    listener.subscribe(OUTBOX_CHANNEL, worker.wake)
    worker.start()
    listener.start()
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await eventually(lambda: counter.calls == 1, timeout=5, what="first wake-up")
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'"
        )
        assert killed == 1
        # Notifications sent while it was gone are lost, so a reconnect wakes every worker once.
        await eventually(lambda: counter.calls == 2, timeout=15, what="the wake-up after reconnecting")
        await eventually(lambda: listener.connected.is_set(), timeout=10, what="reconnected")
        async with admin.transaction():
            await admin.execute(f"NOTIFY {OUTBOX_CHANNEL}")
        await eventually(lambda: counter.calls == 3, timeout=5, what="a NOTIFY after the reconnect")
    finally:
        await admin.close()
        await listener.stop()
        await worker.stop()


async def test_without_wake_ups_the_fallback_timer_runs_the_worker():
    counter = Counter()
    worker = Worker("w", counter.run_once, interval_s=0.2, run_at_start=False)
    worker.start()
    try:
        await asyncio.sleep(0.1)
        assert counter.calls == 0, "run_at_start=False waits one interval first"
        await eventually(lambda: counter.calls >= 3, timeout=5, what="three timer passes")
    finally:
        await worker.stop()


async def test_failures_back_off_and_the_worker_carries_on():
    transient = OperationalError("SELECT 1", {}, ConnectionRefusedError("db down"))
    counter = Counter([transient, transient, ValueError("a bug"), 5, 0])
    worker = Worker("w", counter.run_once, interval_s=60, backoff_initial_s=0.05, backoff_max_s=0.2)
    worker.start()
    try:
        await eventually(lambda: counter.calls >= 5, timeout=10, what="passes after the failures")
        assert worker.failures == 3
        assert worker.passes == 2  # the pass that did 5 items runs again at once, the empty one sleeps
        assert "ValueError" in (worker.last_error or "")
        await asyncio.sleep(0.3)
        assert counter.calls == 5, "an empty pass sleeps until woken or the 60 s timer"
        worker.wake()
        await eventually(lambda: counter.calls == 6, timeout=5, what="the woken pass")
    finally:
        await worker.stop()


async def test_full_batches_run_again_at_once_partial_ones_wait():
    counter = Counter([100, 100, 30, 0])
    worker = Worker("w", counter.run_once, interval_s=60, full_batch=100)
    worker.start()
    try:
        await eventually(lambda: counter.calls == 3, timeout=5, what="two full batches and a partial one")
        await asyncio.sleep(0.3)
        assert counter.calls == 3
    finally:
        await worker.stop()


async def test_stop_drains_a_draining_worker_and_stops_the_others_after_their_pass():
    draining = Counter([10, 10, 10, 0])
    plain = Counter([10, 10, 10, 0])
    w1 = Worker("drains", draining.run_once, interval_s=60, run_at_start=False, drain_on_stop=True)
    w2 = Worker("plain", plain.run_once, interval_s=60, run_at_start=False)
    w1.start()
    w2.start()
    await asyncio.sleep(0.05)
    await asyncio.gather(w1.stop(), w2.stop())
    assert draining.calls == 4, "a draining worker runs until a pass finds nothing"
    assert plain.calls <= 1
    assert not w1.running and not w2.running


async def test_relay_worker_publishes_rows_committed_by_another_engine_without_polling(db, broker, topic_prefix):
    """Two processes share a database: the one holding the relay hears of the other's commits."""
    url, sm = db
    other_engine = create_engine(url, pool_size=2)
    other = create_sessionmaker(other_engine)
    producer = make_producer(broker.bootstrap)
    await producer.start()
    relay = OutboxRelay(name="r", sessionmaker=sm, producer=producer, topic_prefix=topic_prefix)
    worker = Worker("relay:r", relay.run_once, interval_s=60, full_batch=relay.batch_size, drain_on_stop=True)
    listener = Listener(url)
    listener.subscribe(OUTBOX_CHANNEL, worker.wake)
    listener.start()
    worker.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await eventually(lambda: worker.passes >= 1, timeout=10, what="the first pass")
        started = time.monotonic()
        async with other() as s:
            await enqueue_models(s, TOPIC_SEGMENTS, [_membership(i) for i in range(3)])
            await s.commit()
        got = await read_topic(broker.bootstrap, topic_prefix + TOPIC_SEGMENTS, min_count=3, timeout=10)
        assert sorted(m["id"] for m in got) == ["m0", "m1", "m2"]
        assert time.monotonic() - started < 5, "published on the NOTIFY, not on the 60 s timer"
        # A set-based select notifies too, and counts what it wrote.
        async with other() as s:
            n = await enqueue_select(
                s,
                "SELECT :t, 'c9', convert_to(CAST(:v AS text), 'UTF8')",
                {"t": TOPIC_SEGMENTS, "v": _membership(9).model_dump_json()},
            )
            await s.commit()
        assert n == 1
        got = await read_topic(broker.bootstrap, topic_prefix + TOPIC_SEGMENTS, min_count=4, timeout=10)
        assert "m9" in {m["id"] for m in got}
        async with sm() as s:
            assert (await s.execute(text("SELECT count(*) FROM outbox"))).scalar() == 0
    finally:
        await listener.stop()
        await worker.stop()
        await producer.stop()
        await other_engine.dispose()


async def test_enqueue_models_refuses_a_message_of_another_topic(db):
    _, sm = db
    from crm_common.contract.messages import MessageRequested
    from crm_common.settings import TOPIC_MESSAGES

    async with sm() as s:
        try:
            await enqueue_models(s, TOPIC_MESSAGES, [_membership(1)])
        except TypeError as exc:
            assert "MessageRequested" in str(exc)
        else:
            raise AssertionError("a segment message was accepted for crm.messages.v1")
        await enqueue_models(
            s,
            TOPIC_MESSAGES,
            [MessageRequested(id="r1", customer_id="c1", occurred_at="2026-01-05T12:00:00Z", template="t")],
        )
        await s.commit()
        row = (await s.execute(text("SELECT topic, key, value FROM outbox"))).one()
    assert row.topic == TOPIC_MESSAGES and row.key == "c1"
    assert MessageRequested.model_validate_json(bytes(row.value)).template == "t"


async def test_a_burst_of_wake_ups_is_coalesced_into_one_pass():
    counter = Counter()
    worker = Worker("w", counter.run_once, interval_s=60, run_at_start=False, coalesce_s=0.2)
    worker.start()
    try:
        for _ in range(20):
            worker.wake()
            await asyncio.sleep(0.005)
        await eventually(lambda: counter.calls == 1, timeout=5, what="the coalesced pass")
        await asyncio.sleep(0.3)
        assert counter.calls == 1, "twenty wake-ups within the coalescing window make one pass"
    finally:
        await worker.stop()
