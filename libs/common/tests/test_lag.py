"""Group lag and the drain against the real broker: they never read "done" while a message waits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.consumer import ConsumerRunner, Record
from crm_common.devstack import drain, pipeline_pending
from crm_common.infra import free_port
from crm_common.kafka import make_producer
from crm_common.service import ServiceRuntime, create_service_app
from crm_common.settings import BaseServiceSettings
from crm_common.testing.helpers import TEST_API_KEY, eventually, publish

from .conftest import effect_counts
from .test_consumer import CRASH_SCRIPT, _runner, messages, record_effects

# CRASH_SCRIPT's member: group `<prefix>crash`, batches of 20, 0.3 s each, session timeout 3 s.
CRASH_GROUP = "crash"


async def slowish(session: AsyncSession, records: list[Record]) -> None:
    await record_effects(session, records)
    await asyncio.sleep(0.05)


def _start_crash_member(script: Path, url: str, bootstrap: str, prefix: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(script), url, bootstrap, prefix], stdout=subprocess.PIPE, start_new_session=True
    )
    return proc


async def _kill_mid_batch(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 the member in the middle of a batch, as test_consumer's crash test does."""
    await _next_batch(proc)
    await asyncio.sleep(0.15)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


async def _next_batch(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until the member prints its next batch (the kill ends a read still waiting)."""
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    except TimeoutError:
        pass


async def test_group_lag_counts_every_message_to_the_log_end_without_joining_the_group(broker, topic_prefix, db):
    _, sm = db
    topic = topic_prefix + "crm.events.v1"
    # One key, one produce batch of 40 on one partition: Tansu's ListOffsets says 1 for it.
    await publish(broker.bootstrap, topic, [{"id": f"a{i}", "customer_id": "same", "n": i} for i in range(40)])
    await publish(broker.bootstrap, topic, messages(20))
    observer_producer = make_producer(broker.bootstrap)
    await observer_producer.start()
    observer = ConsumerRunner(
        name="observer",
        topics=[topic],
        handler=record_effects,
        sessionmaker=sm,
        bootstrap_servers=broker.bootstrap,
        producer=observer_producer,
        dlq_topic=topic_prefix + "crm.dlq.v1",
        group_id=topic_prefix + "quiet",
    )
    probe = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await probe.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or [])]
        listed = sum((await probe.end_offsets(tps)).values())
    finally:
        await probe.stop()
    # Nothing committed yet: every message counts, from the log start.
    first = await observer.group_lag()
    print(f"\nlag before consuming: {first.total} (ListOffsets alone says {listed})")
    assert first.total == 60
    assert len(first.by_partition) == 3
    member, producer = await _runner(broker, topic_prefix, sm, record_effects, name="quiet", batch_max=10)
    try:
        await eventually(lambda: member.stats.applied == 60, what="all applied")
        await eventually(lambda: _lag_is(observer, 0), what="group lag 0")
        assert (await observer.group_lag()).by_partition == {tp: 0 for tp in first.by_partition}
        # The observer asked the coordinator all along and never joined: the group has one member.
        state = await member.group_state()
        assert (state.state, state.members, state.unowned) == ("Stable", 1, 0)
        assert member.assigned and len(member.partitions) == 3
        assert member.stats.committed, "the member committed its offsets itself"
        assert member.last_batch_at is not None
        # With no member at all, messages published now still count.
        await member.stop()
        await publish(broker.bootstrap, topic, messages(5, start=100))
        assert await observer.lag() == 5
    finally:
        await member.stop()
        await observer.stop()
        await producer.stop()
        await observer_producer.stop()
    assert observer._lag_client is None and member._lag_client is None, "the lag clients were closed on stop"


async def _lag_is(runner: ConsumerRunner, expected: int) -> bool:
    return await runner.lag() == expected


@dataclass
class Sample:
    at: float
    lag: int
    applied: int
    assigned: bool
    partitions: int


async def test_lag_never_reads_zero_while_messages_wait_when_a_member_is_killed(broker, topic_prefix, db, tmp_path):
    url, sm = db
    total = 600
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(total))
    script = tmp_path / "crash_consumer.py"
    script.write_text(CRASH_SCRIPT)
    first = _start_crash_member(script, url, broker.bootstrap, topic_prefix)
    await _next_batch(first)  # the first member holds every partition and applies batches
    second, producer = await _runner(broker, topic_prefix, sm, slowish, name=CRASH_GROUP, batch_max=20)
    samples: list[Sample] = []
    killed_at: list[float] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            assigned, held = second.assigned, len(second.partitions)
            lag = await second.lag()
            # Effects commit before offsets: read after the lag, they must already be all there
            # whenever the lag says 0.
            applied = len(await effect_counts(sm))
            samples.append(Sample(time.monotonic() - started, lag, applied, assigned, held))
            if lag == 0:
                return
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await eventually(lambda: second.assigned, timeout=30, what="the second member joined")
        await _kill_mid_batch(first)
        killed_at.append(time.monotonic() - started)
        await asyncio.wait_for(sampler, 120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        sampler.cancel()
        await second.stop()
        await producer.stop()
    after_kill = [s for s in samples if s.at > killed_at[0]]
    rebalancing = [s for s in after_kill if not s.assigned]
    print(
        f"\n{len(samples)} samples; max lag {max(s.lag for s in samples)}; after the kill "
        f"{len(rebalancing)} samples with the member unassigned (lag {[s.lag for s in rebalancing][:5]}...); "
        f"lag 0 at {samples[-1].at:.1f} s, {samples[-1].at - killed_at[0]:.1f} s after the kill"
    )
    for s in samples:
        if s.lag == 0:
            assert s.applied == total, f"lag read 0 with {total - s.applied} messages unapplied"
        # Never under-reports: applied-but-uncommitted messages count, unapplied ones always do.
        assert s.lag >= total - s.applied
    assert samples[-1].lag == 0
    # The window of the bug was observed: the member held nothing, yet the lag was not 0.
    assert rebalancing, "no sample caught the rebalance after the kill: nothing was tested"
    assert all(s.lag > 0 for s in rebalancing)
    counts = await effect_counts(sm)
    assert len(counts) == total and set(counts.values()) == {1}


@asynccontextmanager
async def _serve(settings: BaseServiceSettings, consumer_name: str) -> AsyncIterator[tuple[int, ServiceRuntime]]:
    """Run a service app with one slow consumer over real HTTP (the drain reads its ops route)."""

    def configure(runtime):  # type: ignore[no-untyped-def]
        runtime.add_consumer(consumer_name, ["crm.events.v1"], slowish)

    app = create_service_app(settings=settings, title="lag test", description="", configure=configure)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, timeout=30, what="the app serving")
    try:
        yield port, app.state.runtime
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


async def test_drain_waits_until_every_message_is_applied_when_a_member_is_killed(broker, topic_prefix, db, tmp_path):
    url, sm = db
    total = 600
    await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(total))
    script = tmp_path / "crash_consumer.py"
    script.write_text(CRASH_SCRIPT)
    first = _start_crash_member(script, url, broker.bootstrap, topic_prefix)
    await _next_batch(first)  # the first member holds every partition and applies batches
    settings = BaseServiceSettings(
        service_name="lagtest",
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=topic_prefix,
        kafka_consumer_batch_max=20,
        sweeps_enabled=False,
        log_json=False,
    )
    said: list[str] = []
    try:
        async with _serve(settings, CRASH_GROUP) as (port, runtime):
            await eventually(lambda: runtime.consumers[0].assigned, timeout=60, what="the second member joined")
            await _kill_mid_batch(first)
            started = time.monotonic()
            drained = await drain({"lagtest": port}, TEST_API_KEY, timeout=120, say=said.append, report_every=1)
            took = time.monotonic() - started
            counts = await effect_counts(sm)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    print(f"\ndrained={drained} in {took:.1f} s; it said:", *dict.fromkeys(said), sep="\n  ")
    assert drained
    assert len(counts) == total, f"the drain ended with {total - len(counts)} messages unapplied"
    assert set(counts.values()) == {1}
    assert any(line.startswith("draining, waiting for: lagtest/crash: lag ") for line in said), said
    assert said[-1].startswith("pipeline drained")


async def test_drain_gives_up_at_its_bound_and_says_what_was_left():
    said: list[str] = []
    port = free_port()  # nothing listens: the service never answers
    started = time.monotonic()
    drained = await drain({"loyalty": port}, None, timeout=1.5, say=said.append, interval=0.2, report_every=0.5)
    assert not drained
    assert time.monotonic() - started >= 1.5
    assert any(line.startswith("draining, waiting for: loyalty: not answering") for line in said), said
    assert "pipeline not drained within 2 s; left: loyalty: not answering (ConnectError)" in said


async def test_drain_skips_a_service_whose_process_is_gone():
    said: list[str] = []
    drained = await drain({"offers": free_port()}, None, timeout=5, alive=lambda service: False, say=said.append)
    assert drained
    assert said[0] == "offers is not running: what it had not applied stays in the broker"


def test_pipeline_is_pending_while_lag_is_unknown_a_member_is_unassigned_or_the_group_moves():
    settled = {
        "name": "accruals",
        "enabled": True,
        "assigned": True,
        "lag": 0,
        "group": {"state": "Stable", "rebalancing": False, "unowned_partitions": 0},
    }
    assert pipeline_pending("loyalty", {"outbox_backlog": 0, "consumers": [settled]}) == []
    cases = {
        "loyalty/accruals: lag unknown": {"lag": None},
        "loyalty/accruals: lag 7": {"lag": 7},
        "loyalty/accruals: member not assigned": {"assigned": False},
        "loyalty/accruals: group Assigning (rebalancing)": {"group": {"state": "Assigning", "rebalancing": True}},
        "loyalty/accruals: 4 partitions unowned": {"group": {"state": "Stable", "unowned_partitions": 4}},
    }
    for expected, change in cases.items():
        doc = {"outbox_backlog": 0, "consumers": [{**settled, **change}]}
        assert pipeline_pending("loyalty", doc) == [expected]
    assert pipeline_pending("loyalty", {"outbox_backlog": 3, "consumers": []}) == ["loyalty: outbox 3"]
    assert pipeline_pending("loyalty", {"outbox_backlog": -1, "consumers": []}) == ["loyalty: outbox backlog unknown"]
    # A member that this process never started (consumers disabled) is not waited for.
    assert (
        pipeline_pending(
            "loyalty", {"outbox_backlog": 0, "consumers": [{**settled, "enabled": False, "assigned": False}]}
        )
        == []
    )
