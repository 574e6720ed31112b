"""The consume loop: batches in, effects and message ids in one transaction (inbox), then offsets.

Rules it keeps (ARCHITECTURE.md "runtime rules"):
* offsets are committed only after the database transaction that applied the batch commits;
* a failed batch is fetched again by seeking each partition back to the batch's first offset,
  because `getmany` otherwise continues from the fetch position (aiokafka issue 1046);
* a permanently failing message goes to the DLQ with its error and origin, the rest of its batch
  is applied once, and the consumer moves on;
* transient failures (database or broker unreachable) are retried with capped backoff, forever:
  nothing is dropped because a dependency is down for a while;
* a commit during a rebalance may fail with CommitFailedError; the redelivery that follows is
  deduplicated by the inbox, so it is logged and ignored;
* on revocation the in-flight batch finishes and its offsets are committed before the
  partitions are given up;
* lag is the group's lag (every partition of the topics, log end minus the group's committed
  offset), asked through a client of its own that never joins the group, so a member that holds
  nothing during a rebalance never makes the pipeline look drained.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.consumer.group_coordinator import ConnectionGroup
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, OffsetOutOfRangeError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import OffsetAndMetadata
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common import metrics, serde
from crm_common.clock import Clock, SystemClock
from crm_common.errors import is_transient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Record:
    """One decoded topic message."""

    topic: str
    partition: int
    offset: int
    key: str | None
    id: str
    value: dict[str, Any]
    timestamp_ms: int = 0


BatchHandler = Callable[[AsyncSession, list[Record]], Awaitable[None]]


class PoisonMessage(Exception):
    """Raised by a handler for a message that can never be applied (sent to the DLQ at once)."""


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    retries: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GroupLag:
    """Messages of the subscribed topics the group has not committed, in total and by partition."""

    total: int
    by_partition: dict[TopicPartition, int]


@dataclass(frozen=True, slots=True)
class GroupState:
    """The group as the coordinator describes it; `unowned` is None where it cannot be known."""

    state: str
    members: int
    partitions: int
    unowned: int | None

    @property
    def rebalancing(self) -> bool:
        # Tansu names the states between a join and a sync "Unknown" and "Assigning"; Kafka says
        # PreparingRebalance and CompletingRebalance. Only Stable (or Empty) is not moving.
        return self.state not in ("Stable", "Empty")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.runner._assignment = None
        # Wait for the batch in flight, then commit what it applied, before giving partitions up.
        async with self.runner._batch_lock:
            await self.runner._commit_pending()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runner._pending.clear()
        self.runner._assignment = frozenset(assigned)
        metrics.CONSUMER_PARTITIONS.labels(self.runner.name).set(len(assigned))


class ConsumerRunner:
    """Run one consumer group member: fetch, apply through the inbox, commit, repeat."""

    def __init__(
        self,
        *,
        name: str,
        topics: Sequence[str],
        handler: BatchHandler,
        sessionmaker: async_sessionmaker[AsyncSession],
        bootstrap_servers: str,
        producer: AIOKafkaProducer,
        dlq_topic: str,
        group_id: str | None = None,
        inbox_names: dict[str, str] | None = None,
        batch_max: int = 500,
        batch_timeout_ms: int = 200,
        max_retries: int = 5,
        retry_backoff_ms: int = 200,
        max_poll_interval_ms: int = 300_000,
        auto_offset_reset: str = "earliest",
        session_timeout_ms: int = 10_000,
        idle_after_s: float = 5.0,
        idle_fetch_wait_ms: int = 3_000,
        lag_refresh_s: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.topics = list(topics)
        self.handler = handler
        self.sessionmaker = sessionmaker
        self.bootstrap_servers = bootstrap_servers
        self.producer = producer
        self.dlq_topic = dlq_topic
        self.group_id = group_id or name
        self.inbox_names = dict(inbox_names or {})
        self.batch_max = batch_max
        self.batch_timeout_ms = batch_timeout_ms
        self.max_retries = max_retries
        self.retry_backoff_ms = retry_backoff_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.auto_offset_reset = auto_offset_reset
        self.session_timeout_ms = session_timeout_ms
        self.idle_after_s = idle_after_s
        self.idle_fetch_wait_ms = idle_fetch_wait_ms
        self.lag_refresh_s = lag_refresh_s
        self.clock = clock or SystemClock()
        self.stats = ConsumerStats()
        self.consumer: AIOKafkaConsumer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._batch_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._transient_streak = 0
        # None while the member is not in a settled generation (starting, rebalancing, crashed).
        self._assignment: frozenset[TopicPartition] | None = None
        self.last_batch_at: datetime | None = None
        self._lag_client: AIOKafkaConsumer | None = None
        self._lag_lock = asyncio.Lock()
        self._lag_task: asyncio.Task[None] | None = None
        self._log_end_cache: dict[TopicPartition, tuple[int, int]] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.name}")
        if self.lag_refresh_s > 0:
            self._lag_task = asyncio.create_task(self._refresh_lag(), name=f"consumer-lag:{self.name}")

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def assigned(self) -> bool:
        """True once the member holds an assignment of a settled generation (possibly empty)."""
        return self._assignment is not None

    @property
    def partitions(self) -> frozenset[TopicPartition]:
        """The partitions this member holds right now (none while rebalancing)."""
        return self._assignment or frozenset()

    async def wait_started(self, timeout: float = 30) -> None:
        await asyncio.wait_for(self._started.wait(), timeout)

    async def stop(self) -> None:
        """Finish the batch in flight, commit it and leave the group."""
        self._stopping.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, 60)
            except TimeoutError:
                self._task.cancel()
            except Exception:  # already logged by _run
                pass
        if self._lag_task:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        async with self._lag_lock:
            if self._lag_client is not None:
                await self._lag_client.stop()
                self._lag_client = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._assignment = None
                log.exception("consumer %s crashed; restarting in 1 s", self.name)
                await asyncio.sleep(1)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            max_poll_interval_ms=self.max_poll_interval_ms,
            session_timeout_ms=self.session_timeout_ms,
            # Kafka's default; heartbeats are most of what an idle member costs the embedded broker.
            heartbeat_interval_ms=min(3_000, self.session_timeout_ms // 3),
            max_partition_fetch_bytes=4 << 20,
            fetch_max_wait_ms=self.batch_timeout_ms,
        )
        self.consumer = consumer
        consumer.subscribe(self.topics, listener=_Rebalance(self))
        await consumer.start()
        self._started.set()
        idle_since: float | None = None
        wait_ms = self.batch_timeout_ms
        try:
            while not self._stopping.is_set():
                # getmany returns as soon as records are there: a longer wait while idle costs no latency.
                batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.batch_max)
                if not batch:
                    idle_since = idle_since or time.monotonic()
                    quiet = time.monotonic() - idle_since
                    if quiet > self.idle_after_s:
                        # Quiet for a while: the idle fetch wait; quiet for a minute (a night): twice it.
                        wait_ms = self.idle_fetch_wait_ms * (2 if quiet > 12 * self.idle_after_s else 1)
                        self._long_poll(consumer, wait_ms)
                    continue
                if idle_since is not None:
                    idle_since = None
                    wait_ms = self.batch_timeout_ms
                    self._long_poll(consumer, wait_ms)
                async with self._batch_lock:
                    await self._process(consumer, batch)
                    await self._commit_pending()
        finally:
            async with self._batch_lock:
                await self._commit_pending()
            await consumer.stop()
            self.consumer = None
            self._assignment = None
            metrics.CONSUMER_PARTITIONS.labels(self.name).set(0)

    def _long_poll(self, consumer: AIOKafkaConsumer, fetch_wait_ms: int) -> None:
        """Let the broker hold fetches longer while the topics are quiet, and shorter again once
        messages flow: an idle platform then costs the broker a fetch every 1.5-2.5 s per member
        instead of five a second, and only the first message after a quiet spell waits longer.
        Measured on the embedded broker (Tansu answers an empty fetch after about half its wait
        and a fetch with data at once): a 3 s wait, a fetch every 1.5 s and the first message
        0.2-0.33 s late; a 5 s wait, every 2 s and up to 1.2 s late.
        aiokafka reads the fetch wait for every request it builds; it has no public setter."""
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = fetch_wait_ms

    # -- processing ----------------------------------------------------------------------------

    async def _process(self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]]) -> None:
        started = time.perf_counter()
        records: list[Record] = []
        poison: list[tuple[Any, str]] = []
        for msgs in batch.values():
            for msg in msgs:
                rec = self._decode(msg)
                if isinstance(rec, Record):
                    records.append(rec)
                else:
                    poison.append((msg, rec))
        try:
            for msg, error in poison:
                await self._dead_letter_raw(msg, error, consumer=None)
            if records:
                await self._apply_batch(records)
            self._transient_streak = 0
        except Exception as exc:
            if is_transient(exc):
                await self._rewind(consumer, batch, exc)
                return
            log.warning("consumer %s: batch failed (%r); applying one by one", self.name, exc)
            try:
                await self._apply_one_by_one(records)
            except Exception as exc2:
                if not is_transient(exc2):
                    raise
                await self._rewind(consumer, batch, exc2)
                return
        for tp, msgs in batch.items():
            self._pending[tp] = msgs[-1].offset + 1
        self.stats.batches += 1
        self.last_batch_at = self.clock.now()
        metrics.CONSUMER_BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    async def _rewind(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]], exc: BaseException
    ) -> None:
        """Seek every partition of the batch back so the same messages come again."""
        self.stats.retries += 1
        self._transient_streak += 1
        metrics.CONSUMER_RETRIES.labels(self.name).inc()
        delay = min(10.0, self.retry_backoff_ms / 1000 * 2 ** min(self._transient_streak, 6)) * (
            0.5 + random.random() / 2
        )
        log.warning("consumer %s: transient failure (%r); retrying the batch in %.2f s", self.name, exc, delay)
        for tp, msgs in batch.items():
            if tp in consumer.assignment():
                consumer.seek(tp, msgs[0].offset)
        await asyncio.sleep(delay)

    def _decode(self, msg: Any) -> Record | str:
        try:
            value = serde.loads(msg.value)
        except Exception as exc:
            return f"undecodable JSON: {exc}"
        if not isinstance(value, dict) or not isinstance(value.get("id"), str) or not value["id"]:
            return "message has no string 'id'"
        return Record(
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            key=msg.key.decode(errors="replace") if msg.key is not None else None,
            id=value["id"],
            value=value,
            timestamp_ms=msg.timestamp or 0,
        )

    def inbox_name(self, topic: str) -> str:
        """Who the inbox says applied a message of `topic`: the group, or the name the topic's
        messages were recorded under before they shared this consumer (`inbox_names`)."""
        return self.inbox_names.get(topic, self.group_id)

    async def _claim(self, session: AsyncSession, records: list[Record]) -> list[Record]:
        """Record the ids in the inbox and return the records not applied before, first occurrence only."""
        if not self.inbox_names:
            ids = list({r.id: None for r in records})
            result = await session.execute(
                text(
                    "INSERT INTO inbox (consumer, message_id) SELECT :c, unnest(CAST(:ids AS text[])) "
                    "ON CONFLICT DO NOTHING RETURNING :c, message_id"
                ),
                {"c": self.group_id, "ids": ids},
            )
        else:
            pairs = list({(self.inbox_name(r.topic), r.id): None for r in records})
            result = await session.execute(
                text(
                    "INSERT INTO inbox (consumer, message_id) "
                    "SELECT * FROM unnest(CAST(:cs AS text[]), CAST(:ids AS text[])) "
                    "ON CONFLICT DO NOTHING RETURNING consumer, message_id"
                ),
                {"cs": [p[0] for p in pairs], "ids": [p[1] for p in pairs]},
            )
        fresh = {(row[0], row[1]) for row in result}
        out = []
        for r in records:
            key = (self.inbox_name(r.topic), r.id)
            if key in fresh:
                out.append(r)
                fresh.discard(key)
        self.stats.duplicates += len(records) - len(out)
        return out

    async def _apply_batch(self, records: list[Record]) -> None:
        async with self.sessionmaker() as session:
            try:
                fresh = await self._claim(session, records)
                if fresh:
                    await self.handler(session, fresh)
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
        self.stats.applied += len(fresh)
        metrics.CONSUMER_MESSAGES.labels(self.name, "applied").inc(len(fresh))

    async def _apply_one_by_one(self, records: list[Record]) -> None:
        for rec in records:
            attempt = 0
            while True:
                try:
                    await self._apply_batch([rec])
                    break
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    attempt += 1
                    if isinstance(exc, PoisonMessage) or attempt > self.max_retries:
                        await self._dead_letter(rec, exc)
                        break
                    await asyncio.sleep(self.retry_backoff_ms / 1000 * attempt)

    async def _dead_letter(self, rec: Record, exc: BaseException) -> None:
        """Publish the message to the DLQ with its error and origin, then mark it handled."""
        payload = {
            "id": f"dlq:{self.group_id}:{rec.topic}:{rec.partition}:{rec.offset}",
            "consumer": self.group_id,
            "source_topic": rec.topic,
            "partition": rec.partition,
            "offset": rec.offset,
            "message_id": rec.id,
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": "".join(traceback.format_exception(exc))[-4000:],
            "failed_at": self.clock.now().isoformat(),
            "value": rec.value,
        }
        await (await self.producer.send(self.dlq_topic, value=serde.dumps(payload), key=(rec.key or "").encode()))
        async with self.sessionmaker() as session:
            await session.execute(
                text("INSERT INTO inbox (consumer, message_id) VALUES (:c, :m) ON CONFLICT DO NOTHING"),
                {"c": self.inbox_name(rec.topic), "m": rec.id},
            )
            await session.commit()
        self.stats.dead_lettered += 1
        metrics.CONSUMER_MESSAGES.labels(self.name, "dead_lettered").inc()
        log.error("consumer %s: message %s sent to DLQ: %r", self.name, rec.id, exc)

    async def _dead_letter_raw(self, msg: Any, error: str, consumer: Any) -> None:
        raw = msg.value.decode(errors="replace") if isinstance(msg.value, bytes) else str(msg.value)
        payload = {
            "id": f"dlq:{self.group_id}:{msg.topic}:{msg.partition}:{msg.offset}",
            "consumer": self.group_id,
            "source_topic": msg.topic,
            "partition": msg.partition,
            "offset": msg.offset,
            "message_id": None,
            "error": error[:2000],
            "failed_at": self.clock.now().isoformat(),
            "raw": raw[:100_000],
        }
        await (await self.producer.send(self.dlq_topic, value=serde.dumps(payload), key=msg.key))
        self.stats.dead_lettered += 1
        metrics.CONSUMER_MESSAGES.labels(self.name, "dead_lettered").inc()

    # -- offsets and lag -----------------------------------------------------------------------

    async def _commit_pending(self) -> None:
        consumer = self.consumer
        if not self._pending or consumer is None:
            return
        offsets = {tp: OffsetAndMetadata(off, "") for tp, off in self._pending.items()}
        try:
            await consumer.commit(offsets)
            self.stats.committed.update(self._pending)
        except (CommitFailedError, IllegalStateError) as exc:
            # Expected around rebalances; the next owner re-reads and the inbox drops the repeats.
            log.info("consumer %s: commit skipped during rebalance (%r)", self.name, exc)
        except KafkaError as exc:
            log.warning("consumer %s: commit failed (%r); will be redelivered and deduplicated", self.name, exc)
        self._pending.clear()

    async def _lag_consumer(self) -> AIOKafkaConsumer:
        """The runner's own client for lag queries: it has the group id but never subscribes, so
        it never joins the group (no rebalance), and it answers while the member is rebalancing."""
        if self._lag_client is None:
            client = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers,
                group_id=self.group_id,
                client_id=f"{self.name}-lag",
                enable_auto_commit=False,
                request_timeout_ms=10_000,
            )
            try:
                await client.start()
            except BaseException:
                await client.stop()
                raise
            self._lag_client = client
        return self._lag_client

    async def _topic_partitions(self, client: AIOKafkaConsumer) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for topic in self.topics:
            parts = client.partitions_for_topic(topic)
            if not parts:
                await client._client.force_metadata_update()
                parts = client.partitions_for_topic(topic) or set()
            out.extend(TopicPartition(topic, p) for p in sorted(parts))
        return out

    async def _log_ends(self, client: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The log end offset (high-water mark) of each partition.

        Tansu 0.6 answers ListOffsets(latest) with the base offset of the last record batch plus
        one, not the log end: after one batch of 10 it says 1. A fetch from that batch's base
        offset returns only that batch and, in its header, the true high-water mark; on Kafka both
        agree. So: ListOffsets, then one small fetch per leader for the partitions whose answer
        changed since the last call (an unchanged answer means no batch was appended, on either
        broker). A partition whose end cannot be confirmed makes the lag unknown, never smaller.
        """
        listed = await client.end_offsets(tps)
        ends: dict[TopicPartition, int] = {}
        by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))
        for tp in tps:
            cached = self._log_end_cache.get(tp)
            if listed[tp] == 0:
                ends[tp] = 0
            elif cached is not None and cached[0] == listed[tp]:
                ends[tp] = cached[1]
            else:
                leader = client._client.cluster.leader_for_partition(tp)
                if leader is not None and leader >= 0:
                    by_leader[leader][tp.topic].append((tp.partition, listed[tp] - 1, 1))
        requests = [
            client._client.send(leader, FetchRequest(100, 1, 1 << 20, 0, list(topics.items())))
            for leader, topics in by_leader.items()
        ]
        for response in await asyncio.gather(*requests):
            for topic, partitions in response.topics:
                for partition, error_code, highwater, *_ in partitions:
                    tp = TopicPartition(topic, partition)
                    if tp not in listed:
                        continue
                    if error_code == 0:
                        ends[tp] = max(listed[tp], highwater)
                    elif error_code == OffsetOutOfRangeError.errno:
                        # Only Kafka gets here (retention emptied the partition), and its
                        # ListOffsets is the log end.
                        ends[tp] = listed[tp]
                    else:
                        continue
                    self._log_end_cache[tp] = (listed[tp], ends[tp])
        unknown = [tp for tp in tps if tp not in ends]
        if unknown:
            raise KafkaError(f"log end of {len(unknown)} partitions not confirmed (e.g. {unknown[0]})")
        return ends

    async def group_lag(self) -> GroupLag:
        """The group's lag: for every partition of the topics, log end minus the group's committed
        offset (log start where it has none), whichever member holds it, or none."""
        async with self._lag_lock:
            client = await self._lag_consumer()
            tps = await self._topic_partitions(client)
            ends = await self._log_ends(client, tps)
            # One OffsetFetch for all partitions (what `committed()` sends for one); the coordinator
            # answers for any partition of the group, held by this member or not.
            committed = {
                tp: meta.offset for tp, meta in (await client._coordinator.fetch_committed_offsets(tps)).items()
            }
            missing = [tp for tp in tps if committed.get(tp, -1) < 0]
            if missing:
                committed.update(await client.beginning_offsets(missing))
        by_partition = {tp: max(0, ends[tp] - committed[tp]) for tp in tps}
        for tp, lag in by_partition.items():
            metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(lag)
        return GroupLag(total=sum(by_partition.values()), by_partition=by_partition)

    async def lag(self) -> int:
        """Messages of the subscribed topics not yet committed by this group (see `group_lag`)."""
        return (await self.group_lag()).total

    async def group_state(self) -> GroupState:
        """The group's state and members as the coordinator says, and its partitions nobody holds
        (known when the broker reports assignments, or when this member is the only one)."""
        async with self._lag_lock:
            client = await self._lag_consumer()
            tps = await self._topic_partitions(client)
            coordinator = client._coordinator
            await coordinator.ensure_coordinator_known()
            response = await client._client.send(
                coordinator.coordinator_id, DescribeGroupsRequest([self.group_id]), group=ConnectionGroup.COORDINATION
            )
        # (error_code, group, state, protocol_type, protocol, members[, authorized_operations]);
        # a member is (member_id, client_id, client_host, member_metadata, member_assignment).
        group = response.groups[0]
        state, members = group[2], group[5]
        held: set[TopicPartition] | None = set()
        for member in members:
            if not member[4] or held is None:
                held = None
                continue
            decoded = ConsumerProtocolMemberAssignment.decode(member[4])
            held.update(TopicPartition(topic, p) for topic, parts in decoded.assignment for p in parts)
        member_id = getattr(self.consumer._coordinator, "member_id", None) if self.consumer else None
        if held is None and [m[0] for m in members] == [member_id]:
            # Tansu reports no assignments; when this member is the group, its own are the group's.
            held = set(self.partitions)
        unowned = None if held is None else len(set(tps) - held)
        if not members:
            unowned = len(tps)
        return GroupState(state=state, members=len(members), partitions=len(tps), unowned=unowned)

    async def _refresh_lag(self) -> None:
        """Keep the lag gauge current for the scraper even when nobody asks /v1/ops/pipeline."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self.group_lag(), 10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("consumer %s: lag not read (%r)", self.name, exc)
            try:
                await asyncio.wait_for(self._stopping.wait(), self.lag_refresh_s)
            except TimeoutError:
                pass
