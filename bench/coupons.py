"""Coupons benchmark: POS validate + redeem latency at a fixed request rate against a running offers app.

1. Its own PostgreSQL and broker (crm_common.infra); the offers schema migrated and N coupons issued
   (as decisions would have left them: 10% off the basket, valid for 14 days, one use each).
2. Runs offers under uvicorn in a subprocess (consumers and sweeps off) on loopback.
3. Ceiling: a trivial authenticated GET (`/v1/campaigns?limit=1`) at the same rate on the same server,
   in slices alternating with the POS ones (the shared machine's noise falls on both). The POS: each transaction a `POST /v1/coupons/validate` and a `POST /v1/coupons/redeem` of a
   fresh code, together `--rate` requests/s (open loop: latency counts from each request's intended send
   time, so queueing is in the figure).
4. Checks that every 200 redemption is one row and one use, nothing more.

Last line: `BENCH coupon_redeem_p99_ms <v>` (target <= 25 ms at 300 requests/s).
"""

# ruff: noqa: E402  (the service package must be importable before the imports below)
from __future__ import annotations

import sys
from pathlib import Path

# Keep this folder off the import path (bench/offers.py is named like the service package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from crm_common.infra import BrokerServer, PostgresServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS
from crm_common.testing.bench import RawHttpPool
from crm_common.testing.helpers import TEST_API_KEY, ServiceProcess

PARTITIONS = 6
LINES = [
    {"sku": "wine-1", "category": "wine", "quantity": "2", "price": "12.50"},
    {"sku": "bread", "category": "bakery", "quantity": "1", "price": "2.40"},
    {"sku": "cheese", "category": "deli", "quantity": "1", "price": "7.90"},
]


async def seed(url: str, n: int, customers: int, now: datetime) -> None:
    """N coupons as `requested` decisions would have issued them (one use, 10% off the basket)."""
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await conn.execute(
            """
            INSERT INTO coupons (code, message_id, campaign_id, version, customer_id, kind, value, target,
                max_uses, uses, valid_from, valid_until, created_at)
            SELECT 'BENCH-' || lpad(i::text, 8, '0'), 'ofr-bench-' || i, 'cmp_bench', 1, 'k' || (i % $2),
                'percent', 10, 'basket', 1, 0, $3, $4, $3
            FROM generate_series(0, $1 - 1) i
            """,
            n,
            customers,
            now - timedelta(days=1),
            now + timedelta(days=13),
        )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def code(i: int) -> str:
    return f"BENCH-{i:08d}"


def customer(i: int, customers: int) -> str:
    return f"k{i % customers}"


async def open_loop(
    pool: RawHttpPool, requests: list[tuple[str, bytes]], rate: int
) -> tuple[dict[str, list[float]], dict[tuple[str, Any], int], float]:
    """Send `requests` ((kind, bytes)) at `rate` per second; latencies per kind from the intended send time."""
    latencies: dict[str, list[float]] = {}
    statuses: dict[tuple[str, Any], int] = {}

    async def one(kind: str, request: bytes, intended: float) -> None:
        try:
            async with asyncio.timeout(5):
                status: Any = await pool.send(request)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            status = type(exc).__name__  # counted; its time (up to the timeout) still goes into the figure
        latencies.setdefault(kind, []).append(time.perf_counter() - intended)
        statuses[(kind, status)] = statuses.get((kind, status), 0) + 1

    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        cpu0 = time.process_time()
        start = time.perf_counter()
        tasks = []
        for i, (kind, request) in enumerate(requests):
            intended = start + i / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(kind, request, intended)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    finally:
        gc.enable()
        gc.unfreeze()
    for xs in latencies.values():
        xs.sort()
    return latencies, statuses, cpu / wall


def q(xs: list[float], f: float) -> float:
    return xs[min(len(xs) - 1, int(f * len(xs)))] * 1000


def show(name: str, xs: list[float]) -> str:
    return f"{name}: n {len(xs)}, p50 {q(xs, 0.5):.1f} ms, p99 {q(xs, 0.99):.1f} ms, max {q(xs, 1.0):.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=300, help="requests per second (validate + redeem together)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--connections", type=int, default=48)
    parser.add_argument("--slices", type=int, default=4, help="ceiling and POS phases alternate this many times")
    args = parser.parse_args()
    transactions = int(args.rate * args.seconds) // 2
    warm = 400
    n = transactions + warm + 1000
    tmp = Path(tempfile.mkdtemp(prefix="bench-coupons-"))
    os.chmod(tmp, 0o755)
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    pg.start()
    broker.start()
    proc: ServiceProcess | None = None
    try:
        admin = await asyncpg.connect(pg.admin_url)
        await admin.execute('CREATE DATABASE "offers"')
        await admin.close()
        url = pg.url("offers")
        await upgrade_async("offers", url)
        now = datetime.now(UTC)
        await seed(url, n, args.customers, now)
        prefix = "bench."
        await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=PARTITIONS)
        print(f"machine: {os.cpu_count()} cores, shared with other engineers' test runs (figures are noisy)")
        print(f"seeded {n} coupons for {args.customers} customers", flush=True)
        proc = ServiceProcess(
            "offers",
            free_port(),
            {
                "OFFERS_DATABASE_URL": url,
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "CRM_TOPIC_PREFIX": prefix,
                "OFFERS_CONSUMERS_ENABLED": "false",
                "OFFERS_SWEEPS_ENABLED": "false",
                "CRM_LOG_LEVEL": "WARNING",
                "CRM_LOG_JSON": "false",
                "CRM_API_KEYS": TEST_API_KEY,
            },
        )
        proc.start()
        host, _, port_text = proc.url.removeprefix("http://").partition(":")
        pool = RawHttpPool(host, int(port_text), args.connections)
        await pool.open()

        def validate(i: int) -> tuple[str, bytes]:
            body = {"code": code(i), "customer_id": customer(i, args.customers), "lines": LINES}
            return "validate", pool.encode_post("/v1/coupons/validate", orjson.dumps(body))

        def redeem(i: int, order: str) -> tuple[str, bytes]:
            body = {"code": code(i), "customer_id": customer(i, args.customers), "order_id": order, "lines": LINES}
            return "redeem", pool.encode_post("/v1/coupons/redeem", orjson.dumps(body))

        ceiling_request = ("ceiling", pool.encode_get("/v1/campaigns?limit=1"))
        try:
            # Warm up concurrently, so the service's pool holds its connections and statements are cached.
            for r in range(warm // args.connections):
                base = r * args.connections
                await asyncio.gather(
                    *(pool.send(redeem(base + j, f"warm-{base + j}")[1]) for j in range(args.connections)),
                    *(pool.send(ceiling_request[1]) for _ in range(args.connections)),
                )
            sequential: dict[str, list[float]] = {"validate": [], "redeem": [], "ceiling": []}
            seq_base = warm
            for i in range(200):  # closed loop, one at a time: the service time of each
                for kind, request in (
                    validate(seq_base + i),
                    redeem(seq_base + i, f"seq-{i}"),
                    ceiling_request,
                ):
                    t = time.perf_counter()
                    await pool.send(request)
                    sequential[kind].append(time.perf_counter() - t)
            print(
                "one at a time: "
                + "; ".join(f"{k} p50 {statistics.median(v) * 1000:.1f} ms" for k, v in sequential.items()),
                flush=True,
            )
            # Ceiling and POS alternate in slices, so the noise of the shared machine falls on both alike.
            slices = max(1, args.slices)
            per = transactions // slices
            ceiling: dict[str, list[float]] = {"ceiling": []}
            lat: dict[str, list[float]] = {"validate": [], "redeem": []}
            c_status: dict[tuple[str, Any], int] = {}
            statuses: dict[tuple[str, Any], int] = {}
            cpus = []
            first = warm + 200
            for sl in range(slices):
                got, st, _ = await open_loop(pool, [ceiling_request] * (per * 2), args.rate)
                ceiling["ceiling"] += got["ceiling"]
                for key, n in st.items():
                    c_status[key] = c_status.get(key, 0) + n
                pos: list[tuple[str, bytes]] = []
                for t in range(sl * per, (sl + 1) * per):
                    pos.append(validate(first + t))
                    pos.append(redeem(first + t, f"order-{t}"))
                got, st, cpu = await open_loop(pool, pos, args.rate)
                cpus.append(cpu)
                for kind, xs in got.items():
                    lat[kind] += xs
                for key, n in st.items():
                    statuses[key] = statuses.get(key, 0) + n
            transactions = per * slices
            for xs in (*lat.values(), ceiling["ceiling"]):
                xs.sort()
            print(
                f"ceiling (GET /v1/campaigns?limit=1 at {args.rate}/s, {slices} slices between the POS ones): "
                f"{show('get', ceiling['ceiling'])}; statuses {c_status}",
                flush=True,
            )
            print(
                f"POS at {args.rate} requests/s ({transactions} transactions of validate + redeem in {slices} slices, "
                f"{args.connections} keep-alive connections; load generator at {max(cpus) * 100:.0f}% of a core):",
                flush=True,
            )
            print("  " + show("validate", lat["validate"]), flush=True)
            print("  " + show("redeem", lat["redeem"]), flush=True)
            print(f"  statuses {statuses}", flush=True)
        finally:
            await pool.close()
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            rows = await conn.fetchval("SELECT count(*) FROM coupon_redemptions WHERE order_id LIKE 'order-%'")
            uses = await conn.fetchval(
                "SELECT coalesce(sum(uses), 0) FROM coupons WHERE code >= $1 AND code < $2",
                code(first),
                code(first + transactions),
            )
            bad = await conn.fetchval(
                "SELECT count(*) FROM coupons c WHERE uses <> (SELECT count(*) FROM coupon_redemptions r "
                "WHERE r.code = c.code AND r.rolled_back_at IS NULL)"
            )
        finally:
            await conn.close()
        ok = statuses.get(("redeem", 200), 0)
        print(f"check: {ok} redemptions answered 200, {rows} rows, {uses} uses; coupons whose uses != rows: {bad}")
        redeem_p99 = q(lat["redeem"], 0.99)
        ceiling_p99 = q(ceiling["ceiling"], 0.99)
        validate_p99 = q(lat["validate"], 0.99)
        ratio: Callable[[float], str] = lambda v: f"{v / ceiling_p99:.2f}"  # noqa: E731
        print(
            f"ratio to the ceiling's p99 ({ceiling_p99:.1f} ms): redeem {ratio(redeem_p99)}, "
            f"validate {ratio(validate_p99)}"
        )
        print(f"BENCH coupon_validate_p99_ms {validate_p99:.1f} ratio={ratio(validate_p99)}")
        print(f"BENCH coupon_redeem_p99_ms {redeem_p99:.1f}")
    finally:
        if proc:
            proc.stop()
        broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
