"""Ingest throughput: batches of 500 purchase events (3 items each) posted with concurrency to
ingest run by uvicorn in its own process, counted when they are on crm.events.v1; compared with
the raw aiokafka producer ceiling for the same messages on the same broker in the same run.

Starts its own PostgreSQL (durable=False: fsync and synchronous_commit off, so the figure is
not bound by this machine's disk) and the embedded broker.

    .venv/bin/python bench/ingest.py [--duration 20] [--concurrency 4] [--batch 500] [--replicas 2] [--workers 1]

(`BENCH_DURATION`, `BENCH_REPLICAS` and `BENCH_WORKERS` also set them.) Ingest runs as `--replicas`
uvicorn processes on their own ports, as replicas behind a Service would, and the client spreads
its connections over them round robin. (Several workers of one uvicorn share one listening socket,
and a handful of keep-alive connections often all land on one of them: one worker then runs at a
full core while the other idles, which measures the kernel's accept order, not ingest.) The value is events accepted (202) AND on
the topic, divided by the time from the first request until the relay's backlog is empty. The
ceiling is the raw aiokafka producer (the service's producer settings) sending the same keys and
values as an application sends them: one `send()` per message, the producer partitioning and
batching. The figure of a second bare producer is printed beside it: hand-built per-partition
record batches, the lower-level path ingest's relay itself uses, which is several times faster
than `send()` on this broker; the ratio to it is printed too, but it is not the BENCH ratio.
The last line is `BENCH ingest_events_per_s <value> ratio=<value/ceiling>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

# This script is called ingest.py: keep its folder off the path so `ingest` is the service package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402

from crm_common.db import create_engine, create_sessionmaker, session_scope  # noqa: E402
from crm_common.infra import (  # noqa: E402
    BrokerServer,
    PostgresServer,
    create_database,
    free_port,
    port_open,
)
from crm_common.kafka import (  # noqa: E402
    ensure_topics,
    make_producer,
    send_batched,
)
from crm_common.migrations import upgrade  # noqa: E402
from crm_common.settings import TOPIC_EVENTS  # noqa: E402
from ingest.keys import add_known_key  # noqa: E402

KEY = "bench-key"
PARTITIONS = 12


def purchase(event_id: str, customer: int, now: str) -> dict:
    return {
        "event_id": event_id,
        "type": "purchase",
        "customer_id": f"cust-{customer}",
        "occurred_at": now,
        "store_id": "store-7",
        "properties": {
            "order_id": f"o-{event_id}",
            "items": [
                {"sku": "sku-100", "name": "Milk 1l", "category": "dairy", "quantity": 2, "unit_price": "1.19"},
                {"sku": "sku-200", "name": "Bread", "category": "bakery", "quantity": 1, "unit_price": "2.49"},
                {
                    "sku": "sku-300",
                    "name": "Apples 1kg",
                    "category": "fruit",
                    "quantity": 1,
                    "unit_price": "3.20",
                    "discount": "0.30",
                },
            ],
            "total": "7.77",
            "currency": "EUR",
        },
    }


_PLACEHOLDER = b"@@BATCHID@@@"


def body_template(size: int) -> bytes:
    """One batch body with a placeholder in every event id, so a fresh batch costs one replace."""
    now = datetime.now(UTC).isoformat()
    events = [purchase(f"{_PLACEHOLDER.decode()}-{i}", i % 50_000, now) for i in range(size)]
    return orjson.dumps({"events": events})


def batch_body(template: bytes) -> bytes:
    return template.replace(_PLACEHOLDER, uuid.uuid4().hex[:12].encode())


async def topic_ids(bootstrap: str, topic: str) -> list[bytes]:
    """Every message on the topic, read from the beginning (the embedded broker's end offsets lag)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[bytes] = []
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                out.extend(m.value for m in records)
        return out
    finally:
        await consumer.stop()


def cpu_seconds(root: int) -> float:
    """CPU time (user+system) of process `root` and all its descendants, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, frontier = 0.0, {root}
    while frontier:
        total += sum(stats[p][1] for p in frontier if p in stats)
        frontier = {p for p, (ppid, _) in stats.items() if ppid in frontier}
    return total


class Uvicorn:
    """ingest under uvicorn in its own process group, as `crm_common.serve` runs it, plus workers."""

    def __init__(self, port: int, env: dict[str, str], workers: int) -> None:
        self.port = port
        self.env = {**os.environ, **env}
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", "ingest.app:create_app", "--factory", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers), "--loop", "uvloop", "--http", "httptools"]
        cmd += ["--no-access-log", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ingest did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def backlog(client: httpx.AsyncClient) -> int:
    return int((await client.get("/v1/ops/pipeline")).json()["outbox_backlog"])


async def post_load(urls: list[str], duration: float, concurrency: int, size: int) -> tuple[int, list[float], int]:
    """Post batches until `duration` is over, connection i to urls[i % len(urls)]; return accepted
    events, latencies, non-202 answers."""
    accepted = 0
    errors = 0
    latencies: list[float] = []
    deadline = time.monotonic() + duration
    template = body_template(size)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=urls[i % len(urls)], timeout=60, limits=limits) for i in range(concurrency)]
    try:

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal accepted, errors
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            while time.monotonic() < deadline:
                body = batch_body(template)
                started = time.perf_counter()
                r = await client.post("/v1/events", content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                if r.status_code == 202:
                    accepted += orjson.loads(r.content)["accepted"]
                else:
                    errors += 1
                    if errors <= 3:
                        print(f"  unexpected answer {r.status_code}: {r.text[:200]}", flush=True)
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(worker(client) for client in clients))
    finally:
        for client in clients:
            await client.aclose()
    return accepted, latencies, errors


async def producer_ceiling(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], seconds: float
) -> tuple[float, float]:
    """Messages/s of a bare aiokafka producer (the service's settings) sending `messages`, both
    one `send()` per message and as per-partition record batches (what the relay does)."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        rates = []
        for batched in (False, True):
            sent = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                for i in range(0, len(messages), 5000):
                    chunk = messages[i : i + 5000]
                    if batched:
                        await send_batched(producer, [(topic, k, v) for k, v in chunk])
                    else:
                        futures = [await producer.send(topic, value=v, key=k) for k, v in chunk]
                        await asyncio.gather(*futures)
                    sent += len(chunk)
            rates.append(sent / (time.perf_counter() - started))
        return rates[0], rates[1]
    finally:
        await producer.stop()


async def sample_messages(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[bytes, bytes]] = []
        while len(out) < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=n)
            if not batch:
                break
            for records in batch.values():
                out.extend((m.key, m.value) for m in records)
        return out[:n]
    finally:
        await consumer.stop()


async def run(args: argparse.Namespace, tmp: Path) -> None:
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    pg.start()
    broker.start()
    procs: list[Uvicorn] = []
    try:
        await asyncio.to_thread(create_database, pg, "ingest")
        url = pg.url("ingest")
        await asyncio.to_thread(upgrade, "ingest", url)
        engine = create_engine(url, pool_size=1)
        async with session_scope(create_sessionmaker(engine)) as s:
            await add_known_key(
                session=s, key=KEY, name="bench", source="pos", scopes=["events:write"], rate_limit_per_s=1e7
            )
        await engine.dispose()
        await ensure_topics(broker.bootstrap, [TOPIC_EVENTS, "bench.ceiling"], partitions=PARTITIONS)

        env = {
            "INGEST_DATABASE_URL": url,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CRM_LOG_JSON": "false",
            "CRM_LOG_LEVEL": "WARNING",
        }
        procs = [Uvicorn(free_port(), env, args.workers) for _ in range(args.replicas)]
        for proc in procs:
            await asyncio.to_thread(proc.start)
        urls = [proc.url for proc in procs]
        print(f"ingest on {', '.join(urls)}; warming up", flush=True)
        async with httpx.AsyncClient(base_url=urls[0]) as ops:
            warm, _, _ = await post_load(urls, 2, 2, args.batch)
            while await backlog(ops) > 0:  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.1)

            print(
                f"posting batches of {args.batch} with concurrency {args.concurrency} for {args.duration:.0f} s"
                f" to {args.replicas} ingest replica(s) of {args.workers} uvicorn worker(s) each",
                flush=True,
            )
            postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
            assert broker.proc is not None
            watched = {
                **{f"ingest {i + 1}": proc.proc.pid for i, proc in enumerate(procs) if proc.proc is not None},
                "postgres": postmaster,
                "broker": broker.proc.pid,
            }
            cpu_before = {name: cpu_seconds(m) for name, m in watched.items()}
            own_before = time.process_time()
            started = time.perf_counter()
            accepted, latencies, errors = await post_load(urls, args.duration, args.concurrency, args.batch)
            posted_s = time.perf_counter() - started
            while await backlog(ops) > 0:  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            cpu = {name: (cpu_seconds(m) - cpu_before[name]) / elapsed for name, m in watched.items()}
            cpu["bench client"] = (time.process_time() - own_before) / elapsed
        values = await topic_ids(broker.bootstrap, TOPIC_EVENTS)
        delivered = len(values) - warm
        unique = len({orjson.loads(v)["id"] for v in values})
        rate = min(delivered, accepted) / elapsed
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        print(
            f"accepted {accepted} events in {len(latencies)} requests ({errors} not 202) over {posted_s:.1f} s; "
            f"all on {TOPIC_EVENTS} after {elapsed:.1f} s ({delivered} delivered, {unique} distinct ids on the topic incl. warm-up)",
            flush=True,
        )
        print(
            f"request latency p50 {p50:.1f} ms  p99 {p99:.1f} ms  (batches of {args.batch}, concurrency {args.concurrency})",
            flush=True,
        )
        print("CPU cores busy during the run: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
        print(
            f"ingest accepted {accepted / posted_s:,.0f} events/s; accepted and delivered end to end {rate:,.0f} events/s",
            flush=True,
        )

        for proc in procs:
            proc.stop()
        procs = []
        sample = [(orjson.loads(v)["customer_id"].encode(), v) for v in values[:20_000]]
        one_by_one, batched = await producer_ceiling(
            broker.bootstrap, "bench.ceiling", sample, max(5.0, args.duration / 4)
        )
        ceiling = one_by_one
        print(
            f"raw aiokafka producer, same messages, same broker: {one_by_one:,.0f} msg/s with send() (the ceiling); "
            f"{batched:,.0f} msg/s as hand-built record batches",
            flush=True,
        )
        print(
            f"ratio to the send() producer: {rate / one_by_one:.2f}; to the record-batch producer: {rate / batched:.2f}"
        )
        print(
            "(shared 2-core machine: PostgreSQL, the broker, ingest, this client and other work compete for the cores;"
            f" load average {os.getloadavg()[0]:.1f})"
        )
        print(f"BENCH ingest_events_per_s {rate:.0f} ratio={rate / ceiling:.2f}", flush=True)
    finally:
        for proc in procs:
            proc.stop()
        broker.stop()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", "20")))
    # 4 requests in flight (2 per replica) keep two replicas busy here; more only add queueing.
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--replicas", type=int, default=int(os.environ.get("BENCH_REPLICAS", "2")), help="ingest processes"
    )
    parser.add_argument(
        "--workers", type=int, default=int(os.environ.get("BENCH_WORKERS", "1")), help="uvicorn workers per replica"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crm-bench-ingest-") as tmp:
        os.chmod(tmp, 0o755)
        asyncio.run(run(args, Path(tmp)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
