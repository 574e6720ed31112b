"""Offers benchmark: trigger evaluation per second against 50 active campaigns, and latency from ingest's
202 to the message request on crm.messages.v1.

1. Its own PostgreSQL and broker (crm_common.infra). 50 active campaigns (event triggers with property
   filters, browse/cart abandonment timers, segment entries, time triggers), and a customer cache with
   profile digests and memberships, as the segments topic would have left it.
2. Publishes N events (product views, cart updates, purchases, custom events) to crm.events.v1.
   Baseline: the same consume loop (inbox, one transaction per batch, offsets after commit) with a handler
   that only inserts the raw events. Then the offers events handler on the same events, with the outbox
   relay publishing the message requests, as in the service process. Rates count from the first applied
   batch (joining the group is not measured).
3. Runs ingest and offers under uvicorn in subprocesses; posts one event at a time at 500 events/s to
   ingest (open loop) and times each from its 202 to its MessageRequested arriving on crm.messages.v1.

Last lines: `BENCH offers_trigger_p99_ms <v>` and `BENCH offers_events_per_s <v> ratio=<r>`.
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
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from crm_common.clock import SystemClock
from crm_common.db import create_engine, create_sessionmaker
from crm_common.infra import BrokerServer, PostgresServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS
from crm_common.testing.bench import RawHttpPool, consume_rate, publish_events, raw_insert
from crm_common.testing.helpers import TEST_API_KEY, ServiceProcess

PARTITIONS = 6
CATEGORIES = ["shoes", "shirts", "wine", "bread", "milk", "tea", "toys", "books", "garden", "beauty"]
SEGMENTS = ["core", "middle", "frequent", "at_risk", "friday_wine_lovers"]
INGEST_KEY = "bench-offers-ingest-key"


def campaigns(start: datetime) -> list[dict[str, Any]]:
    """50 definitions: 25 event triggers, 10 abandonment timers, 10 segment entries, 5 time triggers."""
    out: list[dict[str, Any]] = []
    for i in range(25):
        if i % 5 == 4:
            trigger = {"kind": "event", "event_type": "custom", "name": f"promo_{i}"}
        elif i % 5 == 3:
            trigger = {"kind": "event", "event_type": "cart_updated", "properties": {"category": CATEGORIES[i % 10]}}
        else:
            trigger = {"kind": "event", "event_type": "product_viewed", "properties": {"category": CATEGORIES[i % 10]}}
        out.append(
            {
                "trigger": trigger,
                "offer": {"kind": "percent", "value": "10", "target": "favourite_product"},
                "limits": {"cooldown_days": 7, "priority": i},
            }
        )
    for i in range(10):
        etype = "cart_updated" if i % 2 else "product_viewed"
        out.append(
            {
                "trigger": {
                    "kind": "no_purchase_after",
                    "event_type": etype,
                    "properties": {"category": CATEGORIES[i]},
                    "wait_hours": 24,
                },
                "limits": {"once_per_customer": True},
            }
        )
    for i in range(10):
        out.append(
            {
                "trigger": {"kind": "segment_entered", "segment_key": SEGMENTS[i % 5]},
                "audience": {"exclude_segments": ["at_risk"]} if i % 2 else {},
            }
        )
    out.append({"trigger": {"kind": "inactivity", "days": 60}})
    out.append({"trigger": {"kind": "purchase_window", "min_days": 7, "max_days": 14}})
    out.append({"trigger": {"kind": "schedule", "date": (start + timedelta(days=30)).date().isoformat()}})
    out.append({"trigger": {"kind": "birthday"}})
    out.append(
        {
            "trigger": {"kind": "event", "event_type": "custom", "name": "bench_ping"},
            "offer": {"kind": "fixed", "value": "5"},
            "control_share": 0,
        }
    )
    for n, body in enumerate(out):
        body.update(name=f"bench campaign {n}", delivery={"template": "bench_offer"})
    return out


async def install(url: str, now: datetime, customers: int, rng: random.Random) -> None:
    """Active campaigns and the customer cache, written with the service's own repository."""
    from offers.repository import OffersRepository
    from offers.schemas import CampaignDefinition

    engine = create_engine(url, pool_size=2)
    sm = create_sessionmaker(engine)
    async with sm() as s:
        repo = OffersRepository(s)
        for n, body in enumerate(campaigns(now)):
            d = CampaignDefinition.model_validate(body)
            await repo.insert_campaign(
                {
                    "id": f"cmp_bench{n:02d}",
                    "state": "active",
                    "version": 1,
                    "now": now,
                    "name": d.name,
                    "definition": d.model_dump(mode="json"),
                    "trigger_kind": d.trigger.kind,
                    "priority": d.limits.priority,
                    "starts_at": None,
                    "ends_at": None,
                }
            )
        digests = []
        for i in range(customers):
            cat = rng.choice(CATEGORIES)
            digests.append(
                {
                    "k": f"c{i:06d}",
                    "at": now,
                    "margin": None,
                    "digest": {
                        "first_name": f"N{i}",
                        "favourite_category": cat,
                        "value_tier": rng.choice(["core", "middle", "middle"]),
                        "favourite_product": {"sku": f"sku-{cat}-{i % 7}", "name": f"{cat} {i % 7}", "category": cat},
                        "orders": rng.randint(1, 30),
                        "avg_check": "35.00",
                    },
                }
            )
        for chunk in range(0, len(digests), 5000):
            await repo.upsert_digests(digests[chunk : chunk + 5000], now)
        await repo.apply_memberships(
            [{"k": f"c{i:06d}", "s": SEGMENTS[i % 5], "at": now} for i in range(customers)], []
        )
        await s.commit()
    await engine.dispose()


def make_events(n: int, customers: int, rng: random.Random, start: datetime) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        cid = f"c{rng.randrange(customers):06d}"
        at = (start + timedelta(milliseconds=i * 10)).isoformat()
        cat = rng.choice(CATEGORIES)
        roll = rng.random()
        if roll < 0.55:
            type_, props = "product_viewed", {"sku": f"sku-{cat}-{i % 7}", "category": cat, "name": f"{cat} {i % 7}"}
        elif roll < 0.75:
            type_, props = (
                "cart_updated",
                {
                    "items": [{"sku": f"sku-{cat}-1", "category": cat, "quantity": "1", "unit_price": "20"}],
                    "total": "20",
                },
            )
        elif roll < 0.9:
            type_, props = (
                "purchase",
                {
                    "order_id": f"o{i}",
                    "total": "20",
                    "currency": "EUR",
                    "items": [{"sku": f"sku-{cat}-1", "category": cat, "quantity": "1", "unit_price": "20"}],
                },
            )
        else:
            type_, props = "custom", {"name": f"promo_{rng.choice([4, 9, 14, 19, 24, 99])}"}
        out.append(
            {
                "id": f"site:e{i}",
                "source": "site",
                "event_id": f"e{i}",
                "type": type_,
                "customer_id": cid,
                "occurred_at": at,
                "received_at": at,
                "properties": props,
            }
        )
    return out


async def _print_relay_passes(url: str, worker: str) -> None:
    """How often the relay ran and how long a pass took (its worker metrics), to place the latency."""
    async with httpx.AsyncClient() as http:
        text_ = (await http.get(f"{url}/metrics")).text
    values = {}
    for line in text_.splitlines():
        if f'worker="{worker}"' in line and not line.startswith("#"):
            name = line.split("{", 1)[0]
            if name.endswith(("_sum", "_count")) or 'outcome="ok"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    n = values.get("crm_worker_pass_seconds_count", 0)
    if n:
        mean = 1000 * values["crm_worker_pass_seconds_sum"] / n
        print(f"  {worker}: {n:.0f} passes, mean pass {mean:.1f} ms", flush=True)


async def latency(
    *, ingest_url: str, offers_url: str, bootstrap: str, prefix: str, rate: int, seconds: float
) -> list[float]:
    """p99 from ingest's 202 to the MessageRequested on crm.messages.v1, open loop at `rate` events/s."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CRM_TOPIC_PREFIX": prefix,
        "CRM_LOG_LEVEL": "WARNING",
        "CRM_LOG_JSON": "false",
        "CRM_API_KEYS": TEST_API_KEY,
    }
    ingest = ServiceProcess("ingest", free_port(), {**env, "INGEST_DATABASE_URL": ingest_url})
    offers = ServiceProcess(
        "offers",
        free_port(),
        {
            **env,
            "OFFERS_DATABASE_URL": offers_url,
            "OFFERS_SWEEPS_ENABLED": "false",
            "OFFERS_GLOBAL_CONTROL_SHARE": "0",
        },
    )
    ingest.start()
    offers.start()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, fetch_max_wait_ms=20
    )
    arrived: dict[str, float] = {}
    ingested: dict[str, float] = {}
    accepted: dict[str, float] = {}
    stop = asyncio.Event()
    try:
        await consumer.start()
        topic = prefix + "crm.messages.v1"
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        # Also when each event reached crm.events.v1: ingest's share of the latency, apart from offers'.
        tps += [TopicPartition(prefix + "crm.events.v1", p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)

        async def listen() -> None:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=50, max_records=5000)
                t = time.perf_counter()
                for msgs in batch.values():
                    for m in msgs:
                        into = arrived if m.topic == topic else ingested
                        into.setdefault(orjson.loads(m.value)["customer_id"], t)

        listener = asyncio.create_task(listen())
        host, _, port_text = ingest.url.removeprefix("http://").partition(":")
        pool = RawHttpPool(host, int(port_text), 48, authorization=f"Bearer {INGEST_KEY}")
        await pool.open()
        try:

            async def post(i: int, tag: str) -> None:
                now = datetime.now(UTC).isoformat()
                body = {
                    "event_id": f"{tag}{i}",
                    "type": "custom",
                    "customer_id": f"{tag}{i}",
                    "occurred_at": now,
                    "properties": {"name": "bench_ping"},
                }
                try:
                    status = await pool.send(pool.encode_post("/v1/events", orjson.dumps(body)))
                except (OSError, asyncio.IncompleteReadError) as exc:
                    print(f"  request {tag}{i} failed: {exc!r}", flush=True)
                    return
                if status == 202:
                    accepted[f"{tag}{i}"] = time.perf_counter()

            # Warm up: connections, consumer groups joined, statement caches.
            for i in range(50):
                await post(i, "warm")
            deadline = time.monotonic() + 60
            while not all(f"warm{i}" in arrived for i in range(50)) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            arrived.clear()
            accepted.clear()
            ingested.clear()
            # Fresh connections: the server closed the idle ones (keep-alive timeout) while we waited.
            await pool.close()
            await pool.open()
            total = int(rate * seconds)
            gc.collect()
            start = time.perf_counter()
            tasks = []
            for i in range(total):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(post(i, "lat")))
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + 30
            while len([k for k in accepted if k in arrived]) < len(accepted) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        finally:
            await pool.close()
        stop.set()
        await listener
        await _print_relay_passes(f"http://127.0.0.1:{ingest.port}", "relay:ingest-events")
        await _print_relay_passes(f"http://127.0.0.1:{offers.port}", "relay:offers")
        conn = await asyncpg.connect(offers_url.replace("+asyncpg", ""))
        try:
            print(
                f"  offers: {await conn.fetchval('SELECT count(*) FROM decisions')} decisions, "
                f"{await conn.fetchval('SELECT count(*) FROM outbox')} messages in its outbox",
                flush=True,
            )
        finally:
            await conn.close()
        lost = [k for k in accepted if k not in arrived]
        to_events = sorted(ingested[k] - accepted[k] for k in accepted if k in ingested)
        to_messages = sorted(arrived[k] - ingested[k] for k in accepted if k in arrived and k in ingested)
        if to_events and to_messages:
            q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] * 1000  # noqa: E731
            print(
                f"  202 -> crm.events.v1 (ingest): p50 {q(to_events, 0.5):.0f} ms, p99 {q(to_events, 0.99):.0f} ms; "
                f"crm.events.v1 -> crm.messages.v1 (offers): p50 {q(to_messages, 0.5):.0f} ms, "
                f"p99 {q(to_messages, 0.99):.0f} ms",
                flush=True,
            )
        print(
            f"  {len(accepted)} accepted of {total}, {len(accepted) - len(lost)} message requests arrived, "
            f"{len(lost)} missing",
            flush=True,
        )
        return sorted(arrived[k] - accepted[k] for k in accepted if k in arrived) + [30.0] * len(lost)
    finally:
        await consumer.stop()
        offers.stop()
        ingest.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    rng = random.Random(11)
    tmp = Path(tempfile.mkdtemp(prefix="bench-offers-"))
    os.chmod(tmp, 0o755)
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    pg.start()
    broker.start()
    try:
        admin = await asyncpg.connect(pg.admin_url)
        for db in ("offers", "raw", "ingest", "offers_latency"):
            await admin.execute(f'CREATE DATABASE "{db}"')
        await admin.close()
        offers_url, raw_url, ingest_url, lat_url = (pg.url(d) for d in ("offers", "raw", "ingest", "offers_latency"))
        for url in (offers_url, raw_url, lat_url):
            await upgrade_async("offers", url)
        await upgrade_async("ingest", ingest_url)
        raw = await asyncpg.connect(raw_url.replace("+asyncpg", ""))
        await raw.execute("CREATE TABLE raw_events (id text PRIMARY KEY, customer_id text, body jsonb)")
        await raw.close()
        now = datetime.now(UTC)
        await install(offers_url, now, args.customers, rng)
        await install(lat_url, now, 100, rng)
        from ingest.keys import add_known_key

        engine = create_engine(ingest_url, pool_size=1)
        async with create_sessionmaker(engine)() as s:
            await add_known_key(
                session=s, key=INGEST_KEY, name="bench", source="site", scopes=["events:write"], rate_limit_per_s=1e7
            )
            await s.commit()
        await engine.dispose()

        prefix = "bench."
        await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=PARTITIONS)
        topic = prefix + "crm.events.v1"
        events = make_events(args.events, args.customers, rng, now - timedelta(days=1))
        t = time.perf_counter()
        await publish_events(broker.bootstrap, topic, events)
        print(f"machine: {os.cpu_count()} cores, shared with other engineers' test runs (figures are noisy)")
        print(
            f"published {len(events)} events for {args.customers} customers in {time.perf_counter() - t:.1f} s "
            f"({PARTITIONS} partitions); 50 active campaigns",
            flush=True,
        )
        del events
        gc.collect()
        from offers.app import create_app  # noqa: F401  (the service's GC setting, as its app sets it)
        from offers.consumers import events_handler
        from offers.evaluation import CampaignCache
        from offers.peers import Peers
        from offers.settings import Settings

        settings = Settings(database_url=offers_url, global_control_share=0.05)
        if settings.gc_gen0_threshold > 0:
            _, g1, g2 = gc.get_threshold()
            gc.set_threshold(settings.gc_gen0_threshold, g1, g2)

        print("evaluation from the topic (one consumer process):")
        raw_rate, _ = await consume_rate(
            name="raw",
            url=raw_url,
            bootstrap=broker.bootstrap,
            topic=topic,
            handler=raw_insert,
            n=args.events,
            batch_max=2000,
        )
        async with httpx.AsyncClient() as http:
            handler = events_handler(SystemClock(), settings, CampaignCache(ttl=2.0), Peers(http, settings))
            offers_rate, _ = await consume_rate(
                name="offers",
                url=offers_url,
                bootstrap=broker.bootstrap,
                topic=topic,
                handler=handler,
                n=args.events,
                batch_max=2000,
                relay=True,
            )
        oc = await asyncpg.connect(offers_url.replace("+asyncpg", ""))
        outcomes = dict(await oc.fetch("SELECT outcome, count(*) FROM decisions GROUP BY 1 ORDER BY 2 DESC"))
        timers = await oc.fetchval("SELECT count(*) FROM timers")
        await oc.close()
        print(f"  decisions by outcome: {outcomes}; abandonment timers: {timers}")
        ratio = offers_rate / raw_rate

        print(
            f"latency: one event per request to ingest at {args.rate}/s for {args.seconds:.0f} s, ingest and "
            "offers under uvicorn in subprocesses, loopback",
            flush=True,
        )
        # Topics of their own: the latency phase's offers must not begin by re-reading the events above.
        lat_prefix = "lat."
        await ensure_topics(broker.bootstrap, [lat_prefix + t for t in ALL_TOPICS], partitions=PARTITIONS)
        lat = await latency(
            ingest_url=ingest_url,
            offers_url=lat_url,
            bootstrap=broker.bootstrap,
            prefix=lat_prefix,
            rate=args.rate,
            seconds=args.seconds,
        )
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        print(
            f"  202 -> MessageRequested: p50 {p(0.5):.0f} ms, p90 {p(0.9):.0f} ms, p99 {p(0.99):.0f} ms, "
            f"max {lat[-1] * 1000:.0f} ms (target p99 <= 500 ms)"
        )
        print(
            f"evaluation: {offers_rate:,.0f} events/s (target >= 5,000/s); raw consume+insert {raw_rate:,.0f}/s; "
            f"ratio {ratio:.2f}"
        )
        print(f"BENCH offers_trigger_p99_ms {p(0.99):.0f}")
        print(f"BENCH offers_events_per_s {offers_rate:.0f} ratio={ratio:.2f}")
    finally:
        broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
