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
  partitions are given up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Wait for the batch in flight, then commit what it applied, before giving partitions up.
        async with self.runner._batch_lock:
            await self.runner._commit_pending()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runner._pending.clear()


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
        batch_max: int = 500,
        batch_timeout_ms: int = 200,
        max_retries: int = 5,
        retry_backoff_ms: int = 200,
        max_poll_interval_ms: int = 300_000,
        auto_offset_reset: str = "earliest",
        session_timeout_ms: int = 10_000,
        idle_after_s: float = 5.0,
        idle_fetch_wait_ms: int = 1_000,
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
        self.batch_max = batch_max
        self.batch_timeout_ms = batch_timeout_ms
        self.max_retries = max_retries
        self.retry_backoff_ms = retry_backoff_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.auto_offset_reset = auto_offset_reset
        self.session_timeout_ms = session_timeout_ms
        self.idle_after_s = idle_after_s
        self.idle_fetch_wait_ms = idle_fetch_wait_ms
        self.clock = clock or SystemClock()
        self.stats = ConsumerStats()
        self.consumer: AIOKafkaConsumer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._batch_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._transient_streak = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.name}")

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

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:
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
            heartbeat_interval_ms=min(1_000, self.session_timeout_ms // 3),
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
                self._export_lag(consumer)
                if not batch:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > self.idle_after_s:
                        self._long_poll(consumer, True)
                        wait_ms = self.idle_fetch_wait_ms
                    continue
                if idle_since is not None:
                    idle_since = None
                    self._long_poll(consumer, False)
                    wait_ms = self.batch_timeout_ms
                async with self._batch_lock:
                    await self._process(consumer, batch)
                    await self._commit_pending()
        finally:
            async with self._batch_lock:
                await self._commit_pending()
            await consumer.stop()
            self.consumer = None

    def _long_poll(self, consumer: AIOKafkaConsumer, idle: bool) -> None:
        """Let the broker hold fetches longer while the topics are quiet, and shorter again once
        messages flow: an idle platform then costs the broker a fetch a second per member
        instead of five, and only the first message after a quiet spell waits a little longer.
        aiokafka reads the fetch wait for every request it builds; it has no public setter."""
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = self.idle_fetch_wait_ms if idle else self.batch_timeout_ms

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

    async def _claim(self, session: AsyncSession, records: list[Record]) -> list[Record]:
        """Record the ids in the inbox and return the records not applied before, first occurrence only."""
        ids = list({r.id: None for r in records})
        result = await session.execute(
            text(
                "INSERT INTO inbox (consumer, message_id) SELECT :c, unnest(CAST(:ids AS text[])) "
                "ON CONFLICT DO NOTHING RETURNING message_id"
            ),
            {"c": self.group_id, "ids": ids},
        )
        fresh = {row[0] for row in result}
        out = []
        for r in records:
            if r.id in fresh:
                out.append(r)
                fresh.discard(r.id)
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
                {"c": self.group_id, "m": rec.id},
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

    def _export_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            committed = self.stats.committed.get(tp)
            if committed is None:
                continue
            metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(max(0, hw - committed))

    async def lag(self) -> int:
        """Messages on the subscribed topics not yet committed by this group (high-water minus committed)."""
        consumer = self.consumer
        if consumer is None:
            return 0
        total = 0
        parts = consumer.assignment()
        if not parts:
            return 0
        ends = await consumer.end_offsets(list(parts))
        for tp in parts:
            committed = self.stats.committed.get(tp)
            if committed is None:
                committed = await consumer.committed(tp) or 0
            total += max(0, ends[tp] - committed)
        return total
