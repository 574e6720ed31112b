"""Loyalty benchmark: accruals per second from the topic, and redemption latency at a fixed request rate.

1. Publishes N purchase events to crm.events.v1 (its own PostgreSQL and broker, via crm_common.infra).
2. Baseline: the same consume loop (inbox, one transaction per batch, offsets after commit) with a handler
   that only inserts the raw events into a table. Then the loyalty handler on the same events, with the
   outbox relay publishing `points.accrued` alongside, as in the service process. Rates count from the first
   applied batch, so joining the consumer group is not measured.
3. Runs loyalty under uvicorn in a subprocess and sends POST /v1/redemptions at 300 requests/s (open loop)
   on loopback; prints p50/p99.

Last line: `BENCH loyalty_accruals_per_s <v> ratio=<r>` (ratio = loyalty rate / raw consume+insert rate).
"""

# ruff: noqa: E402  (the service package must be importable before the imports below)
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the service package: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from crm_common import serde
from crm_common.clock import SystemClock
from crm_common.infra import BrokerServer, PostgresServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS
from crm_common.testing.bench import RawHttpPool, consume_rate, publish_events, raw_insert
from crm_common.testing.helpers import TEST_API_KEY, TEST_AUTH, ServiceProcess

PARTITIONS = 6
PROGRAMME = {
    "base_rate": "0.01",
    "tiers": [{"name": "top", "min_spend": "1000", "rate": "0.03"}],
    "expiry_days": 180,
    "max_redeem_share": "0.30",
    "point_value": "0.01",
    "category_multipliers": {"wine": "2"},
}


def make_events(n: int, customers: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=30)
    out = []
    for i in range(n):
        cid = f"c{rng.randrange(customers):06d}"
        price = f"{rng.randint(100, 20000) / 100:.2f}"
        at = (start + timedelta(seconds=i)).isoformat()
        out.append(
            {
                "id": f"pos:e{i}",
                "source": "pos",
                "event_id": f"e{i}",
                "type": "purchase",
                "customer_id": cid,
                "occurred_at": at,
                "received_at": at,
                "properties": {
                    "order_id": f"o{i}",
                    "total": price,
                    "currency": "EUR",
                    "items": [
                        {
                            "sku": f"s{i % 50}",
                            "category": rng.choice(["wine", "bread", "milk"]),
                            "quantity": "1",
                            "unit_price": price,
                        }
                    ],
                },
            }
        )
    return out


async def redemption_latency(
    pg: PostgresServer,
    url: str,
    bootstrap: str,
    prefix: str,
    rate: int,
    seconds: float,
    customers: list[str],
    connections: int = 48,
) -> tuple[list[float], dict[Any, int]]:
    port = free_port()
    env = {
        "LOYALTY_DATABASE_URL": url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CRM_TOPIC_PREFIX": prefix,
        "LOYALTY_CONSUMERS_ENABLED": "false",
        "LOYALTY_SWEEPS_ENABLED": "false",
        "CRM_LOG_LEVEL": "WARNING",
        "LOYALTY_DB_POOL_SIZE": "10",
        "CRM_API_KEYS": TEST_API_KEY,  # the service requires a key; every request sends it
    }
    proc = ServiceProcess("loyalty", port, env)
    proc.start()
    latencies: list[float] = []
    statuses: dict[Any, int] = {}
    try:
        # The accrual phase leaves points.accrued rows in the outbox; this process's relay publishes them first.
        # Measure redemptions in the steady state: once that backlog is out and the tables are vacuumed.
        t = time.perf_counter()
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            backlog = await conn.fetchval("SELECT count(*) FROM outbox")
            for _ in range(600):
                await asyncio.sleep(0.1)
                if not await conn.fetchval("SELECT count(*) FROM outbox"):
                    break
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()
        print(
            f"  outbox backlog from the accrual phase: {backlog} messages, published and tables vacuumed in "
            f"{time.perf_counter() - t:.1f} s before measuring",
            flush=True,
        )
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=proc.url, timeout=5, limits=limits, headers=TEST_AUTH) as client:
            for _ in range(50):  # warm up connections and the statement cache
                await client.get("/healthz")
            for i in range(20):
                await client.post(
                    "/v1/redemptions",
                    json={
                        "redemption_id": f"warm{i}",
                        "customer_id": customers[i],
                        "check_amount": "10",
                        "points": "1",
                    },
                )

        host, _, port_text = proc.url.removeprefix("http://").partition(":")
        pool = RawHttpPool(host, int(port_text.rstrip("/")), connections)
        await pool.open()
        # Warm up concurrently too, so the service's database pool holds its connections (each new one costs
        # a connect and a round of type introspection) before anything is measured.
        for round_ in range(5):
            await asyncio.gather(
                *(
                    pool.send(
                        pool.encode_post(
                            "/v1/redemptions",
                            serde.dumps(
                                {
                                    "redemption_id": f"warm{round_}-{j}",
                                    "customer_id": customers[(round_ * connections + j) % len(customers)],
                                    "check_amount": "10",
                                    "points": "1",
                                }
                            ),
                        )
                    )
                    for j in range(connections)
                )
            )
        sequential: list[float] = []
        for i in range(300):  # closed loop, one at a time: the service time of one redemption
            request = pool.encode_post(
                "/v1/redemptions",
                serde.dumps(
                    {
                        "redemption_id": f"seq{i}",
                        "customer_id": customers[-1 - i % len(customers)],
                        "check_amount": "10",
                        "points": "1",
                    }
                ),
            )
            t = time.perf_counter()
            await pool.send(request)
            sequential.append(time.perf_counter() - t)
        sequential.sort()
        print(
            f"  one at a time: p50 {sequential[150] * 1000:.1f} ms, p99 {sequential[296] * 1000:.1f} ms "
            f"(capacity of this process on this machine ~{1 / statistics.mean(sequential):.0f} requests/s)",
            flush=True,
        )
        # Open loop at a fixed rate on the raw client: each request's latency counts from its intended send
        # time, so queueing (in the client pool or the server) is in the figure.
        total = int(rate * seconds)
        requests = [
            pool.encode_post(
                "/v1/redemptions",
                serde.dumps(
                    {
                        "redemption_id": f"r{i}",
                        "customer_id": customers[i % len(customers)],
                        "check_amount": "100.00",
                        "points": "5",
                    }
                ),
            )
            for i in range(total)
        ]

        async def one(request: bytes, intended: float) -> None:
            try:
                async with asyncio.timeout(5):
                    status: Any = await pool.send(request)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                # Counted, and its time (up to the 5 s timeout) still goes into the latencies.
                status = type(exc).__name__
            latencies.append(time.perf_counter() - intended)
            statuses[status] = statuses.get(status, 0) + 1

        # The load generator's own pauses would count as latency: no cyclic GC pass over the bench's heap
        # (the 40,000 published events and the rest) while it sends.
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            cpu0 = time.process_time()
            start = time.perf_counter()
            tasks = []
            for i in range(total):
                intended = start + i / rate
                delay = intended - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(requests[i], intended)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            print(
                f"  load generator (raw asyncio HTTP/1.1, {connections} keep-alive connections): CPU {cpu:.2f} s "
                f"over {wall:.1f} s ({cpu / wall * 100:.0f}% of a core, {cpu / total * 1e6:.0f} us/request)",
                flush=True,
            )
        finally:
            gc.enable()
            gc.unfreeze()
            await pool.close()
    finally:
        proc.stop()
    return latencies, statuses


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--customers", type=int, default=4_000)
    parser.add_argument("--rps", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--publish-accruals",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish points.accrued per accrual (the service default)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-loyalty-"))
    os.chmod(tmp, 0o755)
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    pg.start()
    broker.start()
    try:
        admin = await asyncpg.connect(pg.admin_url)
        for db in ("loyalty", "raw"):
            await admin.execute(f'CREATE DATABASE "{db}"')
        await admin.close()
        loyalty_url, raw_url = pg.url("loyalty"), pg.url("raw")
        await upgrade_async("loyalty", loyalty_url)
        await upgrade_async("loyalty", raw_url)  # the same runtime tables (inbox, outbox) for the baseline
        raw = await asyncpg.connect(raw_url.replace("+asyncpg", ""))
        await raw.execute("CREATE TABLE raw_events (id text PRIMARY KEY, customer_id text, body jsonb)")
        await raw.close()
        lc = await asyncpg.connect(loyalty_url.replace("+asyncpg", ""))
        await lc.execute(
            "INSERT INTO programme (id, config, updated_at) VALUES (1, $1::jsonb, now())",
            serde.dumps(PROGRAMME).decode(),
        )
        await lc.close()

        prefix = "bench."
        await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=PARTITIONS)
        topic = prefix + "crm.events.v1"
        events = make_events(args.events, args.customers)
        t = time.perf_counter()
        await publish_events(broker.bootstrap, topic, events)
        print(f"machine: {os.cpu_count()} cores, shared with other engineers' test runs (figures are noisy)")
        print(
            f"published {len(events)} purchase events for {args.customers} customers in "
            f"{time.perf_counter() - t:.1f} s ({PARTITIONS} partitions)",
            flush=True,
        )
        # The broker holds the events now. The bench's own copy (some 500,000 objects at the default size) would
        # otherwise sit in the consumers' heap, and every full GC pass of the measured phases would traverse it.
        del events
        gc.collect()
        # The consumers run with the loyalty process's GC settings (as its app sets them at startup), both of them.
        from crm_common.service import tune_gc
        from loyalty.settings import Settings

        tune_gc(Settings().gc_gen0_threshold)

        print("accruals from the topic (one consumer process):")
        raw_rate, _ = await consume_rate(
            name="raw",
            url=raw_url,
            bootstrap=broker.bootstrap,
            topic=topic,
            handler=raw_insert,
            count_sql="SELECT count(*) FROM raw_events",
            n=args.events,
        )
        from loyalty.consumers import events_handler

        loyalty_rate, _ = await consume_rate(
            name="loyalty",
            url=loyalty_url,
            bootstrap=broker.bootstrap,
            topic=topic,
            handler=events_handler(SystemClock(), publish_accruals=args.publish_accruals),
            count_sql="SELECT count(*) FROM purchases",
            n=args.events,
            relay=True,
        )
        lc = await asyncpg.connect(loyalty_url.replace("+asyncpg", ""))
        bad = await lc.fetchval(
            "SELECT count(*) FROM accounts a WHERE balance <> (SELECT coalesce(sum(points), 0) FROM ledger l "
            "WHERE l.customer_id = a.customer_id)"
        )
        ledger_rows = await lc.fetchval("SELECT count(*) FROM ledger")
        customers = [r[0] for r in await lc.fetch("SELECT customer_id FROM accounts WHERE balance >= 100 ORDER BY 1")]
        await lc.close()
        print(f"  check: {ledger_rows} ledger entries, accounts whose balance != ledger sum: {bad}")
        ratio = loyalty_rate / raw_rate

        print(
            f"redemptions: POST /v1/redemptions at {args.rps}/s for {args.seconds:.0f} s, loyalty under uvicorn "
            f"in a subprocess, loopback, {len(customers)} accounts",
            flush=True,
        )
        lat, statuses = await redemption_latency(
            pg, loyalty_url, broker.bootstrap, prefix, args.rps, args.seconds, customers
        )
        lat.sort()
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        print(
            f"  {len(lat)} requests, statuses {statuses}; latency p50 {p(0.5):.1f} ms, p90 {p(0.9):.1f} ms, "
            f"p99 {p(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms, mean {statistics.mean(lat) * 1000:.1f} ms "
            f"(target p99 <= 25 ms)"
        )
        print(
            f"accruals: {loyalty_rate:,.0f}/s (target >= 5,000/s); raw consume+insert: {raw_rate:,.0f}/s; "
            f"ratio {ratio:.2f}"
        )
        print(f"BENCH loyalty_accruals_per_s {loyalty_rate:.0f} ratio={ratio:.2f}")
    finally:
        broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
