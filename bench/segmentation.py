"""Benchmark of the segmentation service.

(a) Events applied per second from crm.events.v1 with 20 segments defined, through the service's
    real consume loop (inbox, facts, profile recompute, 20 segment evaluations, outbox), against a
    ceiling measured in the same run: raw consume of the same events plus one batched upsert per batch.
(b) A full recompute of N generated profiles (SQL generate_series) against the same 20 segments
    (the time-driven sweep: lifecycle refresh, every segment re-evaluated set-based, sizes recorded),
    against one sequential scan of the profiles table.

Usage: python bench/segmentation.py [--customers 5000] [--profiles 1000000]
Starts its own PostgreSQL (fsync off) and broker. The last line is the recompute BENCH line, the one
before it the events/s line.
"""

# ruff: noqa: E402  (the import path is fixed up before the service package is imported)
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the service package; keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import gc
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from crm_common import serde
from crm_common.clock import ManualClock
from crm_common.consumer import ConsumerRunner
from crm_common.db import create_engine, create_sessionmaker, session_scope
from crm_common.infra import BrokerServer, PostgresServer, create_database, free_port
from crm_common.kafka import ensure_topics, make_producer
from crm_common.migrations import upgrade_async
from crm_common.service import tune_gc
from crm_common.testing.bench import publish_events
from segmentation.builtin import install_builtin_segments
from segmentation.consumers import events_handler
from segmentation.segments import create_segment, recompute_all
from segmentation.settings import Settings

NOW = datetime(2026, 6, 5, 18, 0, tzinfo=UTC)
EXTRA_SEGMENTS: list[tuple[str, dict[str, Any]]] = [
    ("big_spenders", {"attr": "revenue", "op": ">=", "value": 500}),
    ("wine_fans", {"attr": "top_categories", "op": "contains", "value": "wine"}),
    (
        "weekend_beer",
        {
            "purchases": {
                "measure": "orders",
                "category": "beer",
                "day_of_week": ["sat", "sun"],
                "within_days": 30,
            },
            "op": ">=",
            "value": 2,
        },
    ),
    (
        "email_reachable_active",
        {
            "all": [
                {"attr": "consents.email", "op": "=", "value": True},
                {"attr": "lifecycle", "op": "in", "value": ["new", "active"]},
            ]
        },
    ),
    ("champions", {"attr": "rfm_group", "op": "=", "value": "champions"}),
    (
        "web_acquired_buyers",
        {
            "all": [
                {"attr": "acquisition_channel", "op": "=", "value": "web"},
                {"attr": "orders", "op": ">=", "value": 1},
            ]
        },
    ),
    (
        "cheese_month",
        {
            "purchases": {"measure": "quantity", "category": "cheese", "within_days": 30},
            "op": ">",
            "value": 2,
        },
    ),
]
CATEGORIES = ["wine", "beer", "cheese", "bakery", "dairy", "fruit", "meat", "cleaning"]


def generate_events(customers: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    n = 0
    for c in range(customers):
        cid = f"c{c:07d}"
        evs = [
            (
                "customer_updated",
                NOW - timedelta(days=400),
                {
                    "first_name": f"N{c}",
                    "acquisition_channel": rng.choice(["web", "store", "app"]),
                    "consents": {"email": rng.random() < 0.7},
                },
            )
        ]
        for _ in range(10):
            at = NOW - timedelta(days=rng.randint(0, 120), hours=rng.randint(0, 10))
            items = []
            for _ in range(rng.randint(1, 3)):
                cat = rng.choice(CATEGORIES)
                items.append(
                    {
                        "sku": f"{cat}-{rng.randint(1, 20)}",
                        "name": f"{cat} {rng.randint(1, 20)}",
                        "category": cat,
                        "quantity": str(rng.randint(1, 3)),
                        "unit_price": f"{rng.randint(1, 30)}.50",
                        "cost": "1.00",
                    }
                )
            total = sum(float(i["quantity"]) * float(i["unit_price"]) for i in items)
            evs.append(
                (
                    "purchase",
                    at,
                    {
                        "order_id": f"o{n}",
                        "items": items,
                        "total": f"{total:.2f}",
                        "currency": "EUR",
                    },
                )
            )
            n += 1
        for type_, at, props in evs:
            n += 1
            events.append(
                {
                    "id": f"pos:e{n}",
                    "source": "pos",
                    "event_id": f"e{n}",
                    "type": type_,
                    "customer_id": cid,
                    "occurred_at": at.isoformat(),
                    "received_at": at.isoformat(),
                    "properties": props,
                }
            )
    return events


async def publish_generated(bootstrap: str, topic: str, customers: int) -> int:
    """Publish the generated history and return its size.

    The events are not kept: a consumer process does not hold the whole history in memory, and
    every full garbage collection during the measured phases would walk those objects.
    """
    events = generate_events(customers)
    await publish_events(bootstrap, topic, events)
    total = len(events)
    del events
    gc.collect()
    return total


async def ceiling(bootstrap: str, topic: str, url: str, total: int) -> float:
    """Raw consume plus one batched upsert per batch: the floor cost of touching each event once."""
    engine = create_engine(url, pool_size=2)
    async with engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE IF NOT EXISTS raw_events (id text PRIMARY KEY, customer_id text, payload jsonb)")
        )
    sm = create_sessionmaker(engine)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="bench-ceiling",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    seen = 0
    started: float | None = None
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            if not batch:
                continue
            if started is None:
                started = time.perf_counter()
            values = [serde.loads(m.value) for msgs in batch.values() for m in msgs]
            async with session_scope(sm) as s:
                await s.execute(
                    text(
                        "INSERT INTO raw_events (id, customer_id, payload) SELECT i, c, CAST(p AS jsonb) FROM unnest("
                        "CAST(:i AS text[]), CAST(:c AS text[]), CAST(:p AS text[])) AS u(i, c, p) "
                        "ON CONFLICT (id) DO UPDATE SET payload = excluded.payload"
                    ),
                    {
                        "i": [v["id"] for v in values],
                        "c": [v["customer_id"] for v in values],
                        "p": [serde.dumps(v).decode() for v in values],
                    },
                )
            await consumer.commit()
            seen += len(values)
        assert started is not None
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await engine.dispose()


async def service_rate(bootstrap: str, prefix: str, url: str, total: int) -> float:
    """The service's own consume loop and handler, from the first batch to the last."""
    settings = Settings(database_url=url, kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    engine = create_engine(url, pool_size=4)
    sm = create_sessionmaker(engine)
    handler = events_handler(settings, ManualClock(NOW))
    first: list[float] = []

    async def timed(session, records):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.perf_counter())
        await handler(session, records)

    producer = make_producer(bootstrap)
    await producer.start()
    runner = ConsumerRunner(
        name="bench-segmentation",
        topics=[prefix + "crm.events.v1"],
        handler=timed,
        sessionmaker=sm,
        bootstrap_servers=bootstrap,
        producer=producer,
        dlq_topic=prefix + "crm.dlq.v1",
        group_id="bench-segmentation",
        batch_max=settings.kafka_consumer_batch_max,
        batch_timeout_ms=100,
    )
    await runner.start()
    try:
        while runner.stats.applied + runner.stats.duplicates + runner.stats.dead_lettered < total:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - first[0]
        print(
            f"  {runner.stats.batches} batches, {total / max(1, runner.stats.batches):.0f} events per batch on average"
        )
        if runner.stats.dead_lettered:
            raise RuntimeError(f"{runner.stats.dead_lettered} events dead-lettered")
        return total / elapsed
    finally:
        await runner.stop()
        await producer.stop()
        await engine.dispose()


GENERATE_PROFILES = """
INSERT INTO profiles (customer_id, traits, consents, acquisition_channel, first_purchase_at, last_purchase_at, orders, revenue,
    margin, avg_check, discount_share, discounted_orders_share, discount_affinity, top_categories, favourite_category,
    favourite_product, cadence_days, predicted_next_purchase, lifecycle, rfm_r, rfm_f, rfm_m, rfm_group, value_tier, updated_at)
SELECT 'g' || g, jsonb_build_object('first_name', 'N' || g), jsonb_build_object('email', g % 3 <> 0),
    (ARRAY['web', 'store', 'app'])[1 + g % 3],
    CAST(:now AS timestamptz) - make_interval(days => 200 + g % 300),
    CAST(:now AS timestamptz) - make_interval(days => g % 200, hours => g % 24),
    1 + g % 15, (g % 997) * 3.5, (g % 997) * 1.2 - 50, (g % 997) * 3.5 / (1 + g % 15),
    (g % 10) / 20.0, (g % 10) / 10.0, (ARRAY['none', 'discount_lover', 'deal_hunter'])[1 + g % 3],
    jsonb_build_array((ARRAY['wine', 'beer', 'cheese', 'bakery'])[1 + g % 4]), (ARRAY['wine', 'beer', 'cheese', 'bakery'])[1 + g % 4],
    jsonb_build_object('sku', 'sku-' || g % 50), 7 + g % 60,
    CAST(:now AS timestamptz) - make_interval(days => g % 200) + make_interval(days => 7 + g % 60), 'active',
    1 + g % 5, 1 + (g / 5) % 5, 1 + (g / 25) % 5,
    (ARRAY['champions', 'loyal', 'at_risk', 'hibernating'])[1 + g % 4], (ARRAY['core', 'middle', 'middle', 'unprofitable'])[1 + g % 4],
    CAST(:now AS timestamptz)
FROM generate_series(1, CAST(:n AS int)) g
"""

GENERATE_ITEMS = """
INSERT INTO purchase_items (customer_id, order_id, line, sku, name, category, quantity, amount, occurred_at, local_date, local_dow)
SELECT 'g' || (1 + (g::bigint * 7919) % :n), 'go' || g, 0, 'sku-' || g % 50, 'item', (ARRAY['wine', 'beer', 'cheese', 'bakery'])[1 + g % 4],
    1 + g % 3, 5 + g % 20, t, t::date, extract(isodow FROM t)
FROM generate_series(1, CAST(:items AS int)) g, LATERAL (SELECT CAST(:now AS timestamptz) - make_interval(days => g % 90, hours => g % 24) AS t) x
"""


async def recompute(url: str, n: int) -> tuple[float, float, float, dict[str, Any]]:
    # The runtime's engine stops a statement after 60 s; a first fill of a million profiles on a
    # loaded machine takes longer, so the bench uses its own engine without that limit.
    engine = create_async_engine(url, connect_args={"command_timeout": None})
    sm = create_sessionmaker(engine)
    try:
        async with session_scope(sm) as s:
            await s.execute(
                text("TRUNCATE profiles, memberships, membership_log, segment_sizes, outbox, purchase_items")
            )
            await s.execute(text(GENERATE_PROFILES), {"n": n, "now": NOW})
            await s.execute(text(GENERATE_ITEMS), {"n": n, "items": n * 2, "now": NOW})
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE profiles"))
            await conn.execute(text("VACUUM ANALYZE purchase_items"))
            started = time.perf_counter()
            await conn.execute(text("SELECT sum(orders), count(*) FROM profiles"))  # warm the cache once
            started = time.perf_counter()
            await conn.execute(text("SELECT sum(orders), count(DISTINCT acquisition_channel) FROM profiles"))
            scan = time.perf_counter() - started
        started = time.perf_counter()
        async with session_scope(sm) as s:
            first = await recompute_all(session=s, now=NOW)
        fill = time.perf_counter() - started
        async with sm() as s:
            await s.execute(text("DELETE FROM outbox"))
            await s.commit()
        started = time.perf_counter()
        async with session_scope(sm) as s:
            again = await recompute_all(session=s, now=NOW + timedelta(days=1))
        steady = time.perf_counter() - started
        changes = sum(v["entered"] + v["exited"] for v in again["segments"].values())
        filled = sum(v["entered"] for v in first["segments"].values())
        return scan, fill, steady, {"entered_first": filled, "changes_next_day": changes}
    finally:
        await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=5000, help="customers in the event stream (11 events each)")
    parser.add_argument("--profiles", type=int, default=1_000_000, help="generated profiles for the recompute")
    parser.add_argument("--skip-events", action="store_true", help="only run (b)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-seg-"))
    tmp.chmod(0o755)
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    pg.start()
    broker.start()
    try:
        await asyncio.to_thread(create_database, pg, "segmentation")
        url = pg.url("segmentation")
        await upgrade_async("segmentation", url)
        engine = create_engine(url, pool_size=2)
        async with session_scope(create_sessionmaker(engine)) as s:
            await install_builtin_segments(session=s, now=NOW)
            for key, rule in EXTRA_SEGMENTS:
                await create_segment(session=s, key=key, name=key, description=None, rule=rule, now=NOW)
            segments = (await s.execute(text("SELECT count(*) FROM segments"))).scalar_one()
        await engine.dispose()
        prefix = "bench."
        await ensure_topics(
            broker.bootstrap,
            [prefix + "crm.events.v1", prefix + "crm.dlq.v1", prefix + "crm.segments.v1"],
            partitions=3,
        )
        rate = raw = 0.0
        if not args.skip_events:
            # The process is set up as the service's startup does it, for the ceiling and the service alike.
            tune_gc(Settings().gc_gen0_threshold)
            total = await publish_generated(broker.bootstrap, prefix + "crm.events.v1", args.customers)
            print(f"published {total} events for {args.customers} customers; {segments} segments defined")
            raw = await ceiling(broker.bootstrap, prefix + "crm.events.v1", url, total)
            print(f"ceiling (raw consume + batched upsert): {raw:,.0f} events/s")
            rate = await service_rate(broker.bootstrap, prefix, url, total)
            print(f"service (inbox + facts + recompute + {segments} segments + outbox): {rate:,.0f} events/s")
        scan, fill, steady, info = await recompute(url, args.profiles)
        print(
            f"profiles: {args.profiles:,}; sequential scan {scan:.2f} s; first full recompute (fills {info['entered_first']:,} "
            f"memberships, logs and outbox rows) {fill:.2f} s; next-day recompute ({info['changes_next_day']:,} changes) {steady:.2f} s"
        )
        if raw:
            print(f"BENCH segmentation_events_per_s {rate:.0f} ratio={rate / raw:.3f}")
        print(
            f"BENCH segment_recompute_1m_s {steady:.2f} ratio={steady / scan:.1f} n={args.profiles} first_fill_s={fill:.2f}"
        )
    finally:
        broker.stop()
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
