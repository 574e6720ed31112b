"""Benchmark: the notifier's dispatcher sending SMS to a loopback HTTP provider.

Starts its own PostgreSQL and the loopback SMS provider (crm_common.sinks) in a separate process
(so the provider does not compete for this process's interpreter), records N pending messages
through the same domain function the consumer uses, then measures:

* bare: a plain httpx loop posting the same JSON to the same provider with the same concurrency
  (the reference of the ratio); the same loop on aiohttp, the notifier's own HTTP client, is
  printed for information;
* notifier: the dispatcher claiming (FOR UPDATE SKIP LOCKED), rendering, sending, and recording
  states, attempts and delivery events (outbox) until every message is `sent`.

They alternate over three rounds (the machine is shared, its load moves) and the medians count.

Last line: `BENCH notifier_messages_per_s <v> ratio=<notifier/bare>`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# This file is named like the service package; keep its directory off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
from sqlalchemy import text  # noqa: E402

from crm_common.clock import ManualClock  # noqa: E402
from crm_common.contract.events import CustomerUpdatedProps  # noqa: E402
from crm_common.contract.messages import MessageRequested  # noqa: E402
from crm_common.db import create_engine, create_sessionmaker  # noqa: E402
from crm_common.infra import PostgresServer, create_database, free_port, port_open  # noqa: E402
from crm_common.migrations import upgrade_async  # noqa: E402
from crm_common.worker import Worker  # noqa: E402
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

N = int(os.environ.get("BENCH_NOTIFIER_N", "9000"))
CONCURRENCY = int(os.environ.get("BENCH_NOTIFIER_CONCURRENCY", "16"))
CUSTOMERS = 2000
ROUNDS = 3


async def seed_contacts(sessionmaker, now: datetime) -> None:
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


async def seed_messages(sessionmaker, now: datetime, policy: Policy, first: int, count: int) -> None:
    for start in range(first, first + count, 1000):
        reqs = [
            MessageRequested(
                id=f"m{i}",
                customer_id=f"c{i % CUSTOMERS}",
                occurred_at=now,
                kind="transactional",
                template="receipt",
                variables={"order": i, "total": "19.90"},
            )
            for i in range(start, min(first + count, start + 1000))
        ]
        async with sessionmaker() as session:
            await accept_requests(session=session, requests=reqs, now=now, policy=policy)
            await session.commit()


HEADERS = {"Authorization": "Bearer k", "Content-Type": "application/json"}


def bare_body(i: int) -> bytes:
    """The JSON the SMS provider would post for message i."""
    return orjson.dumps(
        {"to": f"+1415{i % CUSTOMERS:07d}", "from": "CRM", "text": f"Hi N{i}, order {i}: 19.90", "reference": f"b{i}"}
    )


async def bare_loop(client: httpx.AsyncClient, url: str, first: int, count: int) -> float:
    """A plain httpx loop with the same concurrency and JSON as the SMS provider; requests/s."""
    todo = iter(range(first, first + count))

    async def worker() -> None:
        # CONCURRENCY workers each sending one request after another: the leanest loop httpx allows.
        for i in todo:
            r = await client.post(url, content=bare_body(i), headers={**HEADERS, "Idempotency-Key": f"b{i}"})
            r.raise_for_status()
            orjson.loads(r.content)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def bare_aiohttp_loop(session: aiohttp.ClientSession, url: str, first: int, count: int) -> float:
    """The same loop on aiohttp (the client the providers use), for information; requests/s."""
    todo = iter(range(first, first + count))

    async def worker() -> None:
        for i in todo:
            headers = {**HEADERS, "Idempotency-Key": f"a{i}"}
            async with session.post(url, data=bare_body(i), headers=headers) as r:
                r.raise_for_status()
                orjson.loads(await r.read())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def dispatch_all(make: Callable[[], Dispatcher], count: int) -> tuple[float, int]:
    """Run a fresh dispatcher over `count` pending messages; messages/s until all are settled."""
    dispatcher = make()
    st = dispatcher.stats
    # The same workers the service runs (notifier.app), without the rest of the runtime.
    workers = [
        Worker(
            f"dispatcher:{i}",
            dispatcher.run_once,
            interval_s=s.dispatch_poll_interval_s,
            full_batch=s.dispatch_batch_size,
        )
        for i, s in enumerate([dispatcher.settings] * max(1, dispatcher.settings.dispatch_workers))
    ]
    dispatcher.wakers.extend(w.wake for w in workers)
    started = time.perf_counter()
    for w in workers:
        w.start()
    while st.sent + st.failed + st.parked < count:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(w.stop() for w in workers))
    return count / elapsed, st.passes


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
        dispatch_poll_interval_s=0.05,
        log_json=False,
    )
    policy = Policy.from_settings(settings)
    engine = create_engine(url, pool_size=10)
    sessionmaker = create_sessionmaker(engine)
    await seed_contacts(sessionmaker, clock.now())
    providers = build_providers(settings)
    renderer = Renderer()

    def make() -> Dispatcher:
        return Dispatcher(
            sessionmaker=sessionmaker,
            settings=settings,
            clock=clock,
            providers=providers,
            renderer=renderer,
            links=Links(settings.public_base_url, TokenSigner("x")),
            policy=policy,
        )

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    sms_url = provider_url + "/v1/sms"
    bare_rates: list[float] = []
    aiohttp_rates: list[float] = []
    rates: list[float] = []
    per_round = N // ROUNDS
    async with (
        httpx.AsyncClient(limits=limits, timeout=10) as client,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session,
    ):
        await bare_loop(client, sms_url, -200, 200)  # warm the pools
        await bare_aiohttp_loop(session, sms_url, -200, 200)
        passes = 0
        # Alternate them so all see the same load of this shared machine.
        for r in range(ROUNDS):
            await seed_messages(sessionmaker, clock.now(), policy, r * per_round, per_round)
            bare_rates.append(await bare_loop(client, sms_url, r * per_round, per_round))
            aiohttp_rates.append(await bare_aiohttp_loop(session, sms_url, r * per_round, per_round))
            rate, n = await dispatch_all(make, per_round)
            rates.append(rate)
            passes += n
            print(
                f"round {r + 1}: bare httpx {bare_rates[-1]:,.0f}/s, bare aiohttp {aiohttp_rates[-1]:,.0f}/s, "
                f"notifier {rates[-1]:,.0f}/s",
                flush=True,
            )
    await providers.aclose()
    async with sessionmaker() as session:
        states = dict((await session.execute(text("SELECT state, count(*) FROM messages GROUP BY state"))).all())
        outbox = (await session.execute(text("SELECT count(*) FROM outbox"))).scalar()
    await engine.dispose()
    return (
        statistics.median(rates),
        statistics.median(bare_rates),
        {
            "states": states,
            "outbox_events": outbox,
            "passes": passes,
            "aiohttp": statistics.median(aiohttp_rates),
        },
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-notifier-") as tmp:
        os.chmod(tmp, 0o755)
        pg = PostgresServer(Path(tmp) / "pg", free_port(), durable=False)
        pg.start()
        port = free_port()
        fake = subprocess.Popen([sys.executable, "-m", "crm_common.sinks", "--port", str(port)])
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
    print(f"messages: {N}, concurrency: {CONCURRENCY}, cores: {os.cpu_count()} (shared machine, other work running)")
    print(f"bare httpx loop: {bare:,.0f} requests/s (median of {ROUNDS} rounds; the ratio's reference)")
    print(
        f"bare aiohttp loop: {info['aiohttp']:,.0f} requests/s (median of {ROUNDS} rounds; "
        f"for information, notifier/aiohttp = {rate / info['aiohttp']:.2f})"
    )
    print(
        f"notifier dispatcher: {rate:,.0f} messages/s, median of {ROUNDS} rounds "
        "(claim, render, send, record state + attempt + outbox event)"
    )
    print(
        f"final states: {info['states']}, outbox events: {info['outbox_events']}, dispatcher passes: {info['passes']}"
    )
    print(f"BENCH notifier_messages_per_s {rate:.0f} ratio={rate / bare:.2f}")


if __name__ == "__main__":
    main()
