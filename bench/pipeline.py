"""Pipeline benchmark: sustained load through all five services, end to end.

1. Its own PostgreSQL and broker (crm_common.infra); the five services under uvicorn in their own
   processes (`crm_common.serve`), each on its own database, consumers on, sweeps off, the global
   control off; a loopback push provider (crm_common.sinks) in this process.
2. Through the ops APIs: a push template and one active campaign, an `event` trigger on the custom
   event `bench_ping`, an `info` offer on push, no control group, once per customer. Through ingest:
   one `customer_updated` per customer (push token and consent), then waits until every service
   has drained.
3. Steps of load at rising rates (`--rates`, `--seconds` each): `bench_ping` events posted to
   ingest in requests of `--batch` events (default 10; open loop, keep-alive connections; with
   `--batch 1` the load generator itself tops out near 250 requests/s on the shared 2 cores), each
   for a customer of its own (so neither the
   frequency cap nor once-per-customer stops a message). Each message is timed from ingest's 202
   to the push provider reading the notifier's request: ingest -> crm.events.v1 -> segmentation,
   loyalty and offers -> crm.messages.v1 -> notifier -> provider.

Prints p50, p90, p99 per rate and the largest rate whose p99 stays within 1 s. Last line
`BENCH pipeline_e2e_p99_ms <p99 at --target-rate>`.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import gc
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson

from crm_common.devstack import pipeline_pending, wait_ready
from crm_common.infra import BrokerServer, PostgresServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS
from crm_common.sinks import LoopbackProvider
from crm_common.testing.bench import RawHttpPool, cpu_snapshot, cpu_used
from crm_common.testing.helpers import TEST_API_KEY, ServiceProcess

PARTITIONS = 6
INGEST_KEY = "bench-pipeline-key"
SERVICES = ("ingest", "segmentation", "loyalty", "offers", "notifier")


async def consumer_counts(urls: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(messages applied, batches) of every consumer so far, by `service/consumer`."""
    out = {}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=30) as http:
        for name, url in urls.items():
            for c in (await http.get(f"{url}/v1/ops/pipeline")).json()["consumers"]:
                out[f"{name}/{c['name']}"] = (c["applied"], c["batches"])
    return out


def print_breakdown(
    events: int, cpu: dict[str, float], counts: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> None:
    """Where the step's CPU went (µs per event, each service beside its database) and how big the
    consumers' batches were: the per-stage breakdown of the latency."""
    parts = []
    for s in SERVICES:
        parts.append(f"{s} {cpu.get(s, 0) / events * 1e6:.0f} + db {cpu.get('pg:' + s, 0) / events * 1e6:.0f}")
    rest = {k: v for k, v in cpu.items() if k not in SERVICES and k.removeprefix("pg:") not in SERVICES}
    parts += [f"{k} {v / events * 1e6:.0f}" for k, v in sorted(rest.items(), key=lambda kv: -kv[1])]
    total = sum(cpu.values())
    print(f"    CPU, µs per event: {', '.join(parts)}; total {total / events * 1e6:.0f}", flush=True)
    sizes = []
    for name, (applied, batches) in counts.items():
        a, b = applied - before.get(name, (0, 0))[0], batches - before.get(name, (0, 0))[1]
        if b:
            sizes.append(f"{name} {a / b:.0f}")
    print(f"    consumers, messages per batch: {', '.join(sizes)}", flush=True)


async def statement_stats(admin_url: str, *, reset: bool = False, top: int = 12) -> None:
    """pg_stat_statements: start afresh (`reset`), or print the statements that took the most time."""
    conn = await asyncpg.connect(admin_url)
    try:
        if reset:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
            return
        rows = await conn.fetch(
            "SELECT d.datname, s.calls, s.total_exec_time, s.rows, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 110) q"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid ORDER BY s.total_exec_time DESC LIMIT $1",
            top,
        )
    finally:
        await conn.close()
    print("    statements by time (database, ms, calls, rows, statement):")
    for r in rows:
        print(f"      {r['datname']:<13} {r['total_exec_time']:7.0f} {r['calls']:6} {r['rows']:7}  {r['q']}")


async def drained(urls: dict[str, str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=30) as http:
        while time.monotonic() < deadline:
            pending: list[str] = []
            for name, url in urls.items():
                pending += pipeline_pending(name, (await http.get(f"{url}/v1/ops/pipeline")).json())
            if not pending:
                return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"not drained after {timeout}s: {pending[:5]}")


def customer_event(cid: str) -> dict[str, Any]:
    return {
        "event_id": f"cu-{cid}",
        "type": "customer_updated",
        "customer_id": cid,
        "occurred_at": datetime.now(UTC).isoformat(),
        "properties": {"push_tokens": [f"tok-{cid}"], "consents": {"push": True}, "timezone": "UTC"},
    }


async def step(
    pool: RawHttpPool, push: LoopbackProvider, rate: int, seconds: float, tag: str, batch: int = 1
) -> list[float]:
    """Open loop at `rate` events/s, `batch` events per request; answers the sorted latencies (s),
    30 s for each lost message."""
    accepted: dict[str, float] = {}
    total = int(rate * seconds)

    async def post(first: int) -> None:
        cids = [f"{tag}{i}" for i in range(first, min(total, first + batch))]
        now = datetime.now(UTC).isoformat()
        events = [
            {
                "event_id": f"ping-{cid}",
                "type": "custom",
                "customer_id": cid,
                "occurred_at": now,
                "properties": {"name": "bench_ping"},
            }
            for cid in cids
        ]
        try:
            status = await pool.send(pool.encode_post("/v1/events", orjson.dumps({"events": events})))
        except (OSError, asyncio.IncompleteReadError) as exc:
            print(f"  request {cids[0]} failed: {exc!r}", flush=True)
            return
        if status == 202:
            t = time.perf_counter()
            for cid in cids:
                accepted[f"tok-{cid}"] = t

    gc.collect()
    start = time.perf_counter()
    tasks = []
    for i in range(0, total, batch):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(i)))
    await asyncio.gather(*tasks)
    sent_for = time.perf_counter() - start

    def arrivals() -> dict[str, float]:
        out: dict[str, float] = {}
        for r in list(push.received):
            token = r.body.get("message", {}).get("token")
            if token in accepted:
                out.setdefault(token, r.at)
        return out

    deadline = time.monotonic() + 60
    while len(arrivals()) < len(accepted) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    got = arrivals()
    lost = len(accepted) - len(got)
    lat = sorted(got[k] - accepted[k] for k in got) + [30.0] * lost
    print(
        f"  {rate}/s asked ({batch} per request): {len(accepted)} accepted of {total} in {sent_for:.1f} s "
        f"(offered {len(accepted) / sent_for:,.0f}/s), {len(got)} pushes received, {lost} missing",
        flush=True,
    )
    return lat


def q(xs: list[float], f: float) -> float:
    return xs[min(len(xs) - 1, int(f * len(xs)))] * 1000 if xs else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="250,500,1000", help="comma-separated events/s, in rising order")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--target-rate", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10, help="events per request (a shop backend's batch)")
    parser.add_argument(
        "--pg-stats",
        action="store_true",
        help="load pg_stat_statements and print each step's most expensive statements by database",
    )
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.chmod(tmp, 0o755)
    stats = ["shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all"]
    pg = PostgresServer(tmp / "pg", free_port(), durable=False, extra_settings=stats if args.pg_stats else ())
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    push = LoopbackProvider().start()
    pg.start()
    broker.start()
    procs: list[ServiceProcess] = []
    try:
        admin = await asyncpg.connect(pg.admin_url)
        for s in SERVICES:
            await admin.execute(f'CREATE DATABASE "{s}"')
        await admin.close()
        for s in SERVICES:
            await upgrade_async(s, pg.url(s))
        from ingest.keys import ensure_key

        await ensure_key(pg.url("ingest"), INGEST_KEY, name="bench", scopes=["events:write"], rate_limit_per_s=1e7)
        prefix = "pipe."
        await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=PARTITIONS)
        ports = {s: free_port() for s in SERVICES}
        urls = {s: f"http://127.0.0.1:{p}" for s, p in ports.items()}
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "CRM_TOPIC_PREFIX": prefix,
            "CRM_LOG_LEVEL": "WARNING",
            "CRM_LOG_JSON": "false",
            "CRM_API_KEYS": TEST_API_KEY,
            "OFFERS_SEGMENTATION_URL": urls["segmentation"],
            "OFFERS_NOTIFIER_URL": urls["notifier"],
            "OFFERS_GLOBAL_CONTROL_SHARE": "0",
            "NOTIFIER_PUSH_BASE_URL": push.url,
            "NOTIFIER_PUSH_RATE_PER_S": os.environ.get("NOTIFIER_PUSH_RATE_PER_S", "5000"),
            "NOTIFIER_QUIET_HOURS_START": "00:00",
            "NOTIFIER_QUIET_HOURS_END": "00:00",
        }
        for s in SERVICES:
            upper = s.upper()
            procs.append(
                ServiceProcess(
                    s,
                    ports[s],
                    {**env, f"{upper}_DATABASE_URL": pg.url(s), f"{upper}_SWEEPS_ENABLED": "false"},
                )
            )
        for p in procs:
            p.start(timeout=60)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=30) as http:
            for s, url in urls.items():
                if await wait_ready(url, timeout=60) is None:
                    raise RuntimeError(f"{s} not ready")
            r = await http.post(
                f"{urls['notifier']}/v1/templates",
                json={
                    "key": "ping",
                    "channel": "push",
                    "locale": "en",
                    "subject": "Ping",
                    "body": "Ping",
                    "variables": [],
                },
            )
            assert r.status_code == 201, r.text
            r = await http.post(
                f"{urls['offers']}/v1/campaigns",
                json={
                    "name": "bench ping",
                    "trigger": {"kind": "event", "event_type": "custom", "name": "bench_ping"},
                    "offer": {"kind": "info"},
                    "delivery": {"template": "ping", "channel": "push"},
                    "limits": {"once_per_customer": True, "collision_minutes": 0},
                    "control_share": 0,
                },
            )
            assert r.status_code == 201, r.text
            r = await http.post(f"{urls['offers']}/v1/campaigns/{r.json()['id']}/activate")
            assert r.status_code == 200, r.text
            tags = ["warm", *[f"r{rate}-" for rate in rates]]
            counts = [50, *[int(rate * args.seconds) for rate in rates]]
            events = [customer_event(f"{t}{i}") for t, n in zip(tags, counts, strict=True) for i in range(n)]
            for i in range(0, len(events), 500):
                r = await http.post(
                    f"{urls['ingest']}/v1/events",
                    json={"events": events[i : i + 500]},
                    headers={"Authorization": f"Bearer {INGEST_KEY}"},
                )
                assert r.status_code == 202 and not r.json()["rejected"], r.text[:500]
        print(f"machine: {os.cpu_count()} cores, shared with other engineers' work (figures are noisy)")
        print(f"  {len(events)} customers posted; waiting for every service to drain", flush=True)
        t = time.perf_counter()
        await drained(urls)
        print(f"  drained in {time.perf_counter() - t:.1f} s", flush=True)
        pool = RawHttpPool("127.0.0.1", ports["ingest"], 64, authorization=f"Bearer {INGEST_KEY}")
        await pool.open()
        try:
            await step(pool, push, 10, 5, "warm")
            results: dict[int, list[float]] = {}
            for rate in rates:
                await pool.close()
                await pool.open()
                if args.pg_stats:
                    await statement_stats(pg.admin_url, reset=True)
                roots = [os.getpid(), int((pg.data_dir / "postmaster.pid").read_text().split()[0])]
                counts, cpu = await consumer_counts(urls), cpu_snapshot(roots)
                results[rate] = await step(pool, push, rate, args.seconds, f"r{rate}-", args.batch)
                await drained(urls)
                print_breakdown(
                    int(rate * args.seconds), cpu_used(cpu, cpu_snapshot(roots)), await consumer_counts(urls), counts
                )
                if args.pg_stats:
                    await statement_stats(pg.admin_url)
        finally:
            await pool.close()
        print("end to end, ingest's 202 -> the push provider reading the notifier's request:")
        for rate, lat in results.items():
            print(
                f"  {rate:>5}/s: p50 {q(lat, 0.5):.0f} ms, p90 {q(lat, 0.9):.0f} ms, p99 {q(lat, 0.99):.0f} ms, "
                f"max {lat[-1] * 1000 if lat else float('nan'):.0f} ms",
                flush=True,
            )
        within = [rate for rate, lat in results.items() if q(lat, 0.99) <= 1000]
        print(f"largest rate with p99 <= 1,000 ms: {max(within) if within else 'none'} events/s (of {rates})")
        target = results.get(args.target_rate) or results[rates[-1]]
        print(f"BENCH pipeline_e2e_p99_ms {q(target, 0.99):.0f}")
    finally:
        for p in procs:
            p.stop()
        push.stop()
        broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
