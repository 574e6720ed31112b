"""Pieces the benchmarks under bench/ share: filling a topic, the raw-consume ceiling, a relay worker,
a minimal HTTP client for open-loop latency phases, and CPU time by platform role."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common import serde
from crm_common.consumer import ConsumerRunner, ConsumerStats, Record
from crm_common.db import create_engine, create_sessionmaker
from crm_common.kafka import make_producer
from crm_common.outbox import OutboxRelay
from crm_common.testing.helpers import TEST_AUTH
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


async def consume_rate(
    *,
    name: str,
    url: str,
    bootstrap: str,
    topic: str,
    handler: Any,
    n: int,
    relay: bool = False,
    batch_max: int = 500,
    count_sql: str | None = None,
) -> tuple[float, ConsumerStats]:
    """Run one consumer (the runtime's consume loop) over the topic until `n` are done: rows
    counted by `count_sql`, or else messages applied or dead-lettered. The rate counts from the
    first applied batch (joining the group is not measured). `relay`: publish the handler's
    outbox as the runtime does, with a relay worker."""
    engine = create_engine(url, pool_size=4)
    sm = create_sessionmaker(engine)
    producer = make_producer(bootstrap)
    await producer.start()
    runner = ConsumerRunner(
        name=name,
        topics=[topic],
        handler=handler,
        sessionmaker=sm,
        bootstrap_servers=bootstrap,
        producer=producer,
        dlq_topic=topic + ".dlq",
        group_id=f"bench-{name}",
        batch_max=batch_max,
        batch_timeout_ms=100,
    )
    out_relay = relay_worker(name, sm, producer) if relay else None
    if out_relay:
        out_relay.start()
    await runner.start()
    first_at = None
    first_count = 0
    try:
        while True:
            if count_sql is None:
                count = runner.stats.applied + runner.stats.dead_lettered
            else:
                async with sm() as session:
                    count = (await session.execute(text(count_sql))).scalar() or 0
            now = time.perf_counter()
            if count and first_at is None:
                first_at, first_count = now, count
            if count >= n:
                break
            await asyncio.sleep(0.01)
        assert first_at is not None
        elapsed = now - first_at
        rate = (n - first_count) / elapsed if elapsed > 0 else float("inf")
        print(
            f"  {name}: {n} events, {n - first_count} after the first batch in {elapsed:.2f} s -> {rate:,.0f} /s "
            f"(dead-lettered {runner.stats.dead_lettered})",
            flush=True,
        )
        return rate, runner.stats
    finally:
        await runner.stop()
        if out_relay:
            await out_relay.stop()
        await producer.stop()
        await engine.dispose()


class RawHttpPool:
    """A minimal HTTP/1.1 client for open-loop phases: a fixed pool of keep-alive connections,
    requests pre-encoded as bytes, responses read by status line and Content-Length. httpx costs
    1-2 ms of CPU per request, which at hundreds a second on 2 shared cores would measure the
    client rather than the service."""

    def __init__(self, host: str, port: int, size: int, *, authorization: str = TEST_AUTH["Authorization"]) -> None:
        self.host, self.port, self.size = host, port, size
        self.authorization = authorization
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await asyncio.open_connection(self.host, self.port))

    def encode_post(self, path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {self.authorization}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def encode_get(self, path: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: {self.authorization}\r\n\r\n"
        ).encode()

    async def send(self, request: bytes) -> int:
        """Send one pre-encoded request on an idle connection; the status (the body is read and dropped)."""
        reader, writer = await self.idle.get()
        try:
            writer.write(request)
            status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()  # the connection's state is unknown: replace it
            self.idle.put_nowait(await asyncio.open_connection(self.host, self.port))
            raise
        self.idle.put_nowait((reader, writer))
        return status

    async def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()


TICKS = os.sysconf("SC_CLK_TCK")


def descendants(roots: Iterable[int]) -> set[int]:
    """The processes of the trees under `roots` (roots included), from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        tree.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(tree.get(pid, []))
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process plus what its reaped children used (cutime + cstime); 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_snapshot(roots: Iterable[int]) -> dict[int, tuple[str, float]]:
    """Each process of the platform under `roots` (this process and the PostgreSQL postmaster, say; other
    engineers' stacks on the machine are not counted) with its role and the CPU seconds it used so far:
    a service by its name (`crm_common.serve <name>`), PostgreSQL's backends by database (`pg:<db>`),
    PostgreSQL's own processes (`pg`), the broker (`broker`), the rest of this process tree (`bench`)."""
    return {pid: (_role(command_line(pid)), cpu_ticks(pid) / TICKS) for pid in descendants(roots)}


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by role between two snapshots, process by process: a process started in between counts
    whole; one that ended in between (a pool's overflow connection, say) is missing from the figures."""
    out: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        earlier = before[pid][1] if pid in before and before[pid][0] == role else 0.0
        out[role] = out.get(role, 0.0) + seconds - earlier
    return out


_PG_OWN = {"checkpointer", "background", "walwriter", "autovacuum", "logical", "archiver", "startup"}


def _role(cmd: str) -> str:
    if m := re.search(r"crm_common\.serve (\w+)", cmd):
        return m.group(1)
    if "tansu" in cmd:
        return "broker"
    if cmd.startswith("postgres"):
        words = cmd.split()
        # "postgres: <user> <db> <client> <state>" for a backend; "postgres: walwriter" etc. otherwise.
        return f"pg:{words[2]}" if len(words) >= 4 and words[1] not in _PG_OWN else "pg"
    return "bench"
