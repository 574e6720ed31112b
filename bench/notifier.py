"""Benchmark: the notifier's dispatcher sending SMS to a loopback HTTP provider.

Starts its own PostgreSQL and a fake SMS provider in a separate process (so the provider does not
compete for this process's interpreter), records N pending messages through the same domain
function the consumer uses, then measures:

* bare: a plain httpx loop posting the same JSON to the same provider with the same concurrency;
* notifier: the dispatcher claiming (FOR UPDATE SKIP LOCKED), rendering, sending, and recording
  states, attempts and delivery events (outbox) until every message is `sent`.

Last line: `BENCH notifier_messages_per_s <v> ratio=<notifier/bare>`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# This file is named like the service package; keep its directory off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import orjson  # noqa: E402
from crm_common.clock import ManualClock  # noqa: E402
from crm_common.contract.events import CustomerUpdatedProps  # noqa: E402
from crm_common.contract.messages import MessageRequested  # noqa: E402
from crm_common.db import create_engine, create_sessionmaker  # noqa: E402
from crm_common.infra import PostgresServer, create_database, free_port, port_open  # noqa: E402
from crm_common.migrations import upgrade_async  # noqa: E402
from notifier.contacts import apply_customer_updates  # noqa: E402
from notifier.dispatcher import Dispatcher  # noqa: E402
from notifier.messages import accept_requests  # noqa: E402
from notifier.models import Template  # noqa: E402
from notifier.policy import Policy  # noqa: E402
from notifier.providers import build_providers  # noqa: E402
from notifier.rendering import Renderer  # noqa: E402
from notifier.repository import NotifierRepository  # noqa: E402
from notifier.settings import Settings  # noqa: E402
from notifier.tokens import TokenSigner  # noqa: E402
from notifier.tracking import Links  # noqa: E402
from sqlalchemy import text  # noqa: E402

N = int(os.environ.get("BENCH_NOTIFIER_N", "10000"))
CONCURRENCY = int(os.environ.get("BENCH_NOTIFIER_CONCURRENCY", "16"))
CUSTOMERS = 2000


async def seed(sessionmaker, now: datetime, policy: Policy) -> None:
    async with sessionmaker() as session:
        repo = NotifierRepository(session)
        repo.add(
            Template(
                id="t1",
                key="receipt",
                channel="sms",
                locale="en",
                subject=None,
                body="Hi {{ customer.first_name }}, order {{ order }}: {{ total }}",
                html=None,
                variables=["order", "total"],
                sample={},
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        updates = [
            (
                f"c{i}",
                CustomerUpdatedProps.model_validate(
                    {"phone": f"+1415{i:07d}", "first_name": f"N{i}", "consents": {"sms": True}}
                ),
                now,
            )
            for i in range(CUSTOMERS)
        ]
        await apply_customer_updates(repo=repo, updates=updates)
        await session.commit()
    for start in range(0, N, 1000):
        reqs = [
            MessageRequested(
                id=f"m{i}",
                customer_id=f"c{i % CUSTOMERS}",
                occurred_at=now,
                kind="transactional",
                template="receipt",
                variables={"order": i, "total": "19.90"},
            )
            for i in range(start, min(N, start + 1000))
        ]
        async with sessionmaker() as session:
            await accept_requests(session=session, requests=reqs, now=now, policy=policy)
            await session.commit()


async def bare_loop(url: str) -> float:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}

        async def one(i: int) -> None:
            async with sem:
                body = orjson.dumps(
                    {
                        "to": f"+1415{i % CUSTOMERS:07d}",
                        "from": "CRM",
                        "text": f"Hi N{i}, order {i}: 19.90",
                        "reference": f"b{i}",
                    }
                )
                r = await client.post(
                    url, content=body, headers={**headers, "Idempotency-Key": f"b{i}"}
                )
                r.raise_for_status()
                orjson.loads(r.content)

        await asyncio.gather(*(one(i) for i in range(200)))  # warm the pool
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(N)))
        return N / (time.perf_counter() - started)


async def run(pg: PostgresServer, provider_url: str) -> tuple[float, float, dict]:
    url = pg.url("notifier_bench")
    await upgrade_async("notifier", url)
    clock = ManualClock(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))
    settings = Settings(
        database_url=url,
        sms_url=provider_url + "/v1/sms",
        sms_rate_per_s=0,
        dispatch_concurrency=CONCURRENCY,
        dispatch_batch_size=int(os.environ.get("BENCH_NOTIFIER_BATCH", "500")),
        dispatch_workers=int(os.environ.get("BENCH_NOTIFIER_WORKERS", "3")),
        log_json=False,
    )
    policy = Policy.from_settings(settings)
    engine = create_engine(url, pool_size=10)
    sessionmaker = create_sessionmaker(engine)
    await seed(sessionmaker, clock.now(), policy)

    bare = await bare_loop(provider_url + "/v1/sms")

    providers = build_providers(settings)
    dispatcher = Dispatcher(
        sessionmaker=sessionmaker,
        settings=settings,
        clock=clock,
        providers=providers,
        renderer=Renderer(),
        links=Links(settings.public_base_url, TokenSigner("x")),
        policy=policy,
    )
    started = time.perf_counter()
    dispatcher.start()
    while dispatcher.stats.sent + dispatcher.stats.failed + dispatcher.stats.parked < N:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await dispatcher.stop()
    await providers.aclose()
    async with sessionmaker() as session:
        states = dict(
            (
                await session.execute(text("SELECT state, count(*) FROM messages GROUP BY state"))
            ).all()
        )
        outbox = (await session.execute(text("SELECT count(*) FROM outbox"))).scalar()
    await engine.dispose()
    return (
        N / elapsed,
        bare,
        {"states": states, "outbox_events": outbox, "passes": dispatcher.stats.passes},
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-notifier-") as tmp:
        os.chmod(tmp, 0o755)
        pg = PostgresServer(Path(tmp) / "pg", free_port(), durable=False)
        pg.start()
        port = free_port()
        fake = subprocess.Popen([sys.executable, "-m", "notifier.fakes", "--port", str(port)])
        try:
            deadline = time.monotonic() + 15
            while not port_open("127.0.0.1", port):
                if time.monotonic() > deadline:
                    raise RuntimeError("fake provider did not start")
                time.sleep(0.05)
            create_database(pg, "notifier_bench")
            try:
                import uvloop  # the service runs on uvloop under uvicorn; measure both sides on it

                rate, bare, info = uvloop.run(run(pg, f"http://127.0.0.1:{port}"))
            except ImportError:
                rate, bare, info = asyncio.run(run(pg, f"http://127.0.0.1:{port}"))
        finally:
            fake.terminate()
            fake.wait(10)
            pg.stop()
    print(
        f"messages: {N}, concurrency: {CONCURRENCY}, cores: {os.cpu_count()} "
        "(shared machine, other work running)"
    )
    print(f"bare httpx loop: {bare:,.0f} requests/s")
    print(
        f"notifier dispatcher: {rate:,.0f} messages/s "
        "(claim, render, send, record state + attempt + outbox event)"
    )
    print(
        f"final states: {info['states']}, outbox events: {info['outbox_events']}, "
        f"dispatcher passes: {info['passes']}"
    )
    print(f"BENCH notifier_messages_per_s {rate:.0f} ratio={rate / bare:.2f}")


if __name__ == "__main__":
    main()
