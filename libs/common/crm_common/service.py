"""Service runtime and FastAPI app factory: engine, producer, consumers, relays, sweeps, ops routes."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import orjson
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import ORJSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, field_validator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from crm_common import metrics, retention
from crm_common.auth import ApiKeys, api_key_dependency
from crm_common.clock import Clock, SystemClock
from crm_common.consumer import BatchHandler, ConsumerRunner, Record
from crm_common.db import create_engine, create_sessionmaker
from crm_common.dlq import read_dead_letters
from crm_common.errors import InvalidInput, NotFound, error_body, install_error_handlers, is_transient
from crm_common.http import BodyLimitMiddleware
from crm_common.kafka import make_producer
from crm_common.logging import configure_logging
from crm_common.notify import OUTBOX_CHANNEL, Listener
from crm_common.outbox import OUTBOX_SWEEP, OutboxQueue, OutboxRelay, outbox_horizon, outbox_sweep
from crm_common.pii import PiiMaskMiddleware
from crm_common.relay_thread import RelayThread
from crm_common.settings import TOPIC_DLQ, BaseServiceSettings
from crm_common.worker import RunOnce, Worker

log = logging.getLogger(__name__)

SweepFn = Callable[[AsyncSession, datetime], Awaitable[Any]]


def route_by_topic(handlers: Mapping[str, BatchHandler]) -> BatchHandler:
    """One batch handler that gives each topic's records to that topic's handler, in batch order."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        by_topic: dict[str, list[Record]] = {}
        for record in records:
            by_topic.setdefault(record.topic, []).append(record)
        for topic, handler in handlers.items():
            if topic in by_topic:
                await handler(session, by_topic[topic])

    return handle


def tune_gc(gen0_threshold: int) -> None:
    """Raise the cyclic collector's generation-0 threshold (process-wide; 0 keeps the default)."""
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)


class ServiceRuntime:
    """Everything a service process holds: made in the lifespan, never at import time.

    Background work runs as `Worker`s (crm_common.worker): the outbox relays, sweeps and any
    service loop (the notifier's dispatcher) are registered here and started and stopped with
    the lifespan; none keeps a loop of its own.
    """

    def __init__(self, settings: BaseServiceSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.engine: AsyncEngine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            command_timeout_s=settings.db_command_timeout_s,
            plan_cache_mode=settings.db_plan_cache_mode,
        )
        self.sessionmaker: async_sessionmaker[AsyncSession] = create_sessionmaker(self.engine)
        # Sessions whose statements commit each on their own, on the same pool: no BEGIN and COMMIT
        # round trips, for a block that runs one statement (atomic by itself), as ingest's POST does.
        self.autocommit_sessionmaker: async_sessionmaker[AsyncSession] = create_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self.producer: AIOKafkaProducer = make_producer(
            settings.kafka_bootstrap_servers,
            enable_idempotence=settings.kafka_enable_idempotence,
            client_id=settings.service_name,
        )
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0))
        self.consumers: list[ConsumerRunner] = []
        self.relays: list[OutboxRelay] = []
        self.workers: dict[str, Worker] = {}
        self.sweeps: dict[str, tuple[float, SweepFn]] = {}
        self.listener = Listener(settings.database_url)
        # The relays run on a loop of their own when `relays_in_thread` (see crm_common.relay_thread).
        self.relay_thread = RelayThread(settings) if settings.relays_in_thread else None
        # The app's state (set by create_service_app): where `configure` puts what routes read.
        self.state: Any = None
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.producer_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        # Workers that need the broker start once the producer is up; the others at once.
        self._kafka_workers: set[str] = set()
        # Workers the relay thread starts and stops.
        self._threaded: set[str] = set()
        self.add_sweep(retention.INBOX_SWEEP, settings.retention_sweep_interval_s, retention.inbox_sweep(settings))

    def topic(self, name: str) -> str:
        """The physical topic name (a prefix isolates tests and tenants sharing one broker)."""
        return self.settings.topic_prefix + name

    def add_consumer(
        self,
        name: str,
        topics: Sequence[str],
        handler: BatchHandler | Mapping[str, BatchHandler],
        *,
        group_id: str | None = None,
        inbox_names: Mapping[str, str] | None = None,
    ) -> ConsumerRunner:
        """Consume `topics` as one group member. `handler` is one batch handler, or one per topic
        (each gets that topic's records of the batch, in order, in the batch's transaction): one
        member for all of a service's topics costs the broker a fetch and a heartbeat instead of
        one per topic. `inbox_names`: per topic, the inbox name its messages were recorded under
        when the topic had a consumer of its own, so that merging consumers re-applies nothing."""
        s = self.settings
        if isinstance(handler, Mapping):
            handler = route_by_topic({self.topic(t): h for t, h in handler.items()})
        runner = ConsumerRunner(
            name=name,
            topics=[self.topic(t) for t in topics],
            handler=handler,
            inbox_names={self.topic(t): f"{s.topic_prefix}{n}" for t, n in (inbox_names or {}).items()},
            sessionmaker=self.sessionmaker,
            bootstrap_servers=s.kafka_bootstrap_servers,
            producer=self.producer,
            dlq_topic=self.topic(TOPIC_DLQ),
            group_id=group_id or f"{s.topic_prefix}{name}",
            batch_max=s.kafka_consumer_batch_max,
            batch_timeout_ms=s.kafka_consumer_batch_timeout_ms,
            idle_after_s=s.kafka_consumer_idle_after_s,
            idle_fetch_wait_ms=s.kafka_consumer_idle_fetch_wait_ms,
            max_retries=s.consumer_max_retries,
            retry_backoff_ms=s.consumer_retry_backoff_ms,
            max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            clock=self.clock,
        )
        self.consumers.append(runner)
        return runner

    def add_worker(
        self,
        name: str,
        run_once: RunOnce,
        *,
        interval_s: float,
        channels: Sequence[str] = (),
        needs_broker: bool = False,
        **options: Any,
    ) -> Worker:
        """Register background work, started and stopped with the service (see `Worker`)."""
        if name in self.workers:
            raise ValueError(f"a worker named {name!r} is already registered")
        worker = Worker(name, run_once, interval_s=interval_s, channels=channels, **options)
        self.workers[name] = worker
        for channel in channels:
            self.listener.subscribe(channel, worker.wake)
        if needs_broker:
            self._kafka_workers.add(name)
        return worker

    def add_relay(self, relay: OutboxRelay | None = None) -> OutboxRelay:
        """Publish this service's outbox (or the queue of `relay`), woken by the commits that fill it."""
        s = self.settings
        relay = relay or OutboxRelay(
            name=s.service_name,
            sessionmaker=self.sessionmaker,
            producer=self.producer,
            batch_size=s.outbox_batch_size,
            topic_prefix=s.topic_prefix,
            queue=OutboxQueue(retention_s=s.outbox_retention_s),
        )
        self.relays.append(relay)
        if relay.queue.keeps_sent and OUTBOX_SWEEP not in self.sweeps:
            self.add_sweep(OUTBOX_SWEEP, s.outbox_sweep_interval_s, outbox_sweep(relay.queue, s.retention_batch_size))
        worker = self.add_worker(
            f"relay:{relay.name}",
            relay.run_once,
            interval_s=s.outbox_poll_interval_ms / 1000,
            channels=(OUTBOX_CHANNEL,),
            needs_broker=self.relay_thread is None,
            full_batch=relay.batch_size,
            drain_on_stop=True,
            coalesce_s=s.outbox_coalesce_ms / 1000,
        )
        if self.relay_thread is not None:
            self._threaded.add(worker.name)
            self.relay_thread.add(relay, worker)
        return relay

    def add_sweep(self, name: str, interval_s: float, fn: SweepFn) -> None:
        """Register a periodic set-based job; it runs on one replica at a time (advisory lock)."""
        self.sweeps[name] = (interval_s, fn)
        if self.settings.sweeps_enabled:

            async def run_once() -> int:
                await self.run_sweep(name)
                return 0

            self.add_worker(f"sweep:{name}", run_once, interval_s=interval_s, run_at_start=False)

    def on_close(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Call `fn` at stop, after every worker and consumer has stopped, before the engine closes."""
        self._closers.append(fn)

    def wake(self, name: str) -> None:
        """Wake one worker by name (e.g. from an after-commit hook)."""
        self.workers[name].wake()

    def wake_relays(self) -> None:
        for relay in self.relays:
            self.workers[f"relay:{relay.name}"].wake()

    async def run_sweep(self, name: str) -> Any:
        """Run one sweep now under its advisory lock; None if another replica holds it."""
        _, fn = self.sweeps[name]
        key = zlib.crc32(f"sweep:{self.settings.service_name}:{name}".encode())
        async with self.sessionmaker() as session:
            got = (await session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key})).scalar()
            if not got:
                return None
            result = await fn(session, self.clock.now())
            await session.commit()
        self.wake_relays()
        return result

    def republishable(self) -> list[OutboxRelay]:
        """The relays whose queue keeps sent rows for a window (not ingest's archive, which replays)."""
        return [r for r in self.relays if r.queue.keeps_sent]

    async def republish(self, since: datetime) -> int:
        """Mark the outbox rows sent at or after `since` unsent again and wake the relays; how many.

        The relays send them again in id order, before anything enqueued later; the consumers'
        inboxes drop what they had already applied. After a broker lost its data (crm_common.recovery).
        """
        horizon = outbox_horizon(self.settings.outbox_retention_s, self.clock.now())
        if since < horizon:
            msg = f"since reaches past the outbox retention window; the earliest allowed is {horizon.isoformat()}"
            raise InvalidInput(
                msg,
                details=[
                    {"loc": ["body", "since"], "msg": msg, "type": "value_error", "earliest": horizon.isoformat()}
                ],
            )
        count = 0
        for relay in self.republishable():
            async with self.sessionmaker() as session:
                count += await relay.queue.republish(session, since)
                await session.commit()
        self.wake_relays()
        log.info("republish: %d outbox rows sent since %s marked unsent", count, since.isoformat())
        return count

    async def start(self) -> None:
        tune_gc(self.settings.gc_gen0_threshold)
        if self.settings.notify_enabled:
            self.listener.start()
        for name, worker in self.workers.items():
            if name not in self._kafka_workers and name not in self._threaded:
                worker.start()
        if self.relay_thread is not None:
            self.relay_thread.start()
        self._tasks.append(asyncio.create_task(self._start_kafka(), name="kafka-start"))

    async def _start_kafka(self) -> None:
        """Start the producer (retrying while the broker is away), then relays and consumers."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self.producer.start()
                break
            except Exception as exc:
                log.warning("broker not reachable (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
        else:
            return
        self.producer_ready.set()
        for name in self._kafka_workers:
            self.workers[name].start()
        if self.settings.consumers_enabled:
            for consumer in self.consumers:
                await consumer.start()

    async def stop(self) -> None:
        """Stop consumers (finish and commit the batch in flight), then the other workers (the
        relays publish what is waiting, bounded), then close the clients."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self.consumers), return_exceptions=True)
        relay_names = {f"relay:{r.name}" for r in self.relays}
        others = [w for n, w in self.workers.items() if n not in relay_names]
        await asyncio.gather(*(w.stop() for w in others), return_exceptions=True)
        await asyncio.gather(
            *(self.workers[n].stop() for n in relay_names if n not in self._threaded), return_exceptions=True
        )
        if self.relay_thread is not None:
            await self.relay_thread.stop()
        await self.listener.stop()
        for close in self._closers:
            try:
                await close()
            except Exception:
                log.exception("closing %r failed", close)
        if self.producer_ready.is_set():
            await self.producer.stop()
        await self.http.aclose()
        await self.engine.dispose()

    async def check_ready(self) -> dict[str, str]:
        """Report whether the database and the broker answer."""
        out = {}
        try:
            async with self.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), 3)
            out["database"] = "ok"
        except Exception as exc:
            out["database"] = f"unreachable: {type(exc).__name__}"
        try:
            if not self.producer_ready.is_set():
                raise ConnectionError("producer not started")
            await asyncio.wait_for(self.producer.client.fetch_all_metadata(), 3)
            out["broker"] = "ok"
        except Exception as exc:
            out["broker"] = f"unreachable: {type(exc).__name__}"
        return out


async def get_runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; committed when the route returns, before the response is sent."""
    runtime: ServiceRuntime = request.app.state.runtime
    async with runtime.sessionmaker() as session:
        try:
            yield session
            if session.in_transaction():
                await session.commit()
                # Relays poll anyway; waking them after commits without outbox rows only adds queries.
                if session.info.pop("outbox_written", False):
                    runtime.wake_relays()
        except BaseException:
            await session.rollback()
            raise


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def _health_router(service: str) -> APIRouter:
    """Probes and metrics: open, for the orchestrator and the scraper."""
    router = APIRouter(tags=["ops"])

    @router.get("/healthz", summary="Process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @router.get("/readyz", summary="Database and broker reachable", responses={503: {"description": "not ready"}})
    async def readyz(runtime: RuntimeDep) -> ORJSONResponse:
        checks = await runtime.check_ready()
        ok = all(v == "ok" for v in checks.values())
        return ORJSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics(runtime: RuntimeDep) -> Response:
        # The lag gauge is read from the broker when it is scraped, not on a timer: an idle
        # platform nobody scrapes asks the broker nothing.
        if runtime.consumers:
            reads = [asyncio.ensure_future(c.group_lag()) for c in runtime.consumers]
            done, pending = await asyncio.wait(reads, timeout=3)
            for task in pending:
                task.cancel()
            for task in done:
                task.exception()  # an unreadable lag leaves the gauge as it was
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


async def _consumer_report(c: ConsumerRunner) -> dict[str, Any]:
    """One consumer as /v1/ops/pipeline shows it: `lag` is the group's (null: not known now)."""
    lag: int | None
    group: dict[str, Any] | None
    try:
        lag = await asyncio.wait_for(c.lag(), 5)
    except Exception:
        lag = None
    try:
        g = await asyncio.wait_for(c.group_state(), 5)
        group = {
            "state": g.state,
            "members": g.members,
            "partitions": g.partitions,
            "unowned_partitions": g.unowned,
            "rebalancing": g.rebalancing,
        }
    except Exception:
        group = None
    return {
        "name": c.name,
        "group_id": c.group_id,
        "topics": c.topics,
        "running": c.consumer is not None,
        "enabled": c.started,
        "assigned": c.assigned,
        "partitions": len(c.partitions),
        "last_batch_at": c.last_batch_at.isoformat() if c.last_batch_at else None,
        "lag": lag,
        "group": group,
        "applied": c.stats.applied,
        "batches": c.stats.batches,
        "duplicates": c.stats.duplicates,
        "dead_lettered": c.stats.dead_lettered,
        "retries": c.stats.retries,
    }


class RepublishIn(BaseModel):
    """Mark the outbox rows sent at or after `since` (an ISO datetime with its offset) unsent again."""

    model_config = ConfigDict(extra="forbid")
    since: AwareDatetime

    @field_validator("since")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # In UTC, as the database compares it; a time that does not exist there is bad input, not a 500.
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("since is out of the range of datetimes") from None


def _ops_router() -> APIRouter:
    """Pipeline state and sweeps on demand: under /v1, so behind the API key like the service's routes."""
    router = APIRouter(tags=["ops"])

    @router.get(
        "/v1/ops/pipeline",
        summary="Consumers (group lag, assignment, group state, applied, dead-lettered) and outbox backlog",
    )
    async def pipeline(runtime: RuntimeDep) -> dict[str, Any]:
        consumers = await asyncio.gather(*(_consumer_report(c) for c in runtime.consumers))
        backlog = 0
        for r in runtime.relays:
            try:
                backlog += await r.backlog(runtime.sessionmaker)
            except Exception:
                backlog = -1
        return {"consumers": consumers, "outbox_backlog": backlog, "sweeps": sorted(runtime.sweeps)}

    @router.get(
        "/v1/ops/dlq",
        summary="The latest dead-lettered messages of this service's consumers, with the error of each",
    )
    async def dead_letters(runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        groups = {c.group_id for c in runtime.consumers}
        items = (
            await read_dead_letters(
                runtime.settings.kafka_bootstrap_servers, runtime.topic(TOPIC_DLQ), consumers=groups, limit=limit
            )
            if groups
            else []
        )
        return {"items": items, "consumers": sorted(groups)}

    @router.post(
        "/v1/ops/republish",
        summary="Send again the outbox rows sent since a time (after a broker lost its data; consumers dedupe)",
        responses={
            404: {"description": "this service keeps no outbox to republish"},
            422: {"description": "bad since"},
        },
    )
    async def republish(body: RepublishIn, runtime: RuntimeDep) -> dict[str, Any]:
        if not runtime.republishable():
            raise NotFound("this service keeps no sent outbox rows to republish (outbox_retention_s is 0 or no outbox)")
        count = await runtime.republish(body.since)
        return {"republished": count, "since": body.since.isoformat()}

    @router.post("/v1/ops/sweeps/{name}", summary="Run a periodic sweep now (one replica at a time)")
    async def run_sweep(name: str, runtime: RuntimeDep) -> dict[str, Any]:
        if name not in runtime.sweeps:
            raise NotFound(f"no sweep named {name!r}", details={"sweeps": sorted(runtime.sweeps)})
        result = await runtime.run_sweep(name)
        return {
            "sweep": name,
            "ran": result is not None,
            "result": result if isinstance(result, dict | int | str | list) else None,
        }

    return router


class _MetricsMiddleware:
    """Count requests and their latency (pure ASGI, cheap on the hot path)."""

    def __init__(self, app: Any, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, int] = {"code": 500}

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = 1
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            # Answer a retryable 503 when the database or broker is away, instead of a 500 with a
            # logged stack trace; anything else goes on to the generic handler.
            if status.get("started") or not is_transient(exc):
                raise
            log.warning("dependency unavailable: %r", exc)
            status["code"] = 503
            body = orjson.dumps(error_body("unavailable", "a dependency is unavailable; retry later"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"retry-after", b"5"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            method = scope.get("method", "GET")
            metrics.HTTP_REQUESTS.labels(self.service, method, str(status["code"])).inc()
            metrics.HTTP_SECONDS.labels(self.service, method).observe(time.perf_counter() - started)


def create_service_app(
    *,
    settings: BaseServiceSettings,
    title: str,
    description: str,
    routers: Sequence[APIRouter] = (),
    public_routers: Sequence[APIRouter] = (),
    require_api_key: bool = True,
    configure: Callable[[ServiceRuntime], Awaitable[None] | None] | None = None,
    clock: Clock | None = None,
    version: str = "0.1.0",
) -> FastAPI:
    """Build a service's FastAPI app with the runtime in its lifespan and the ops routes mounted.

    With `require_api_key` (the default), `routers` and the /v1/ops routes need
    `Authorization: Bearer <key>` with a key of CRM_API_KEYS (`settings.api_keys`): any method
    but GET and HEAD needs its `write` scope, and the answers to a key without `pii` have
    e-mail addresses and phone numbers masked (`crm_common.pii`).
    `public_routers` are never behind it: only routes that authenticate their caller otherwise
    (signed callbacks, signed links) belong there. A service that checks keys itself (ingest)
    passes `require_api_key=False`, and its routes carry their own dependencies.
    """
    configure_logging(settings.log_level, settings.log_json)
    keys = ApiKeys(settings.api_keys.get_secret_value()) if require_api_key else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keys is not None and not keys:
            log.warning(
                "no API keys configured: every /v1 route except public ones answers 401 until CRM_API_KEYS is set"
            )
        runtime = ServiceRuntime(settings, clock=clock)
        app.state.runtime = runtime
        runtime.state = app.state
        if configure is not None:
            maybe = configure(runtime)
            if maybe is not None:
                await maybe
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        # A path with a trailing slash is a 404, not a redirect built from the Host header.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    # Read by the test helpers: a client of this app sends the test key.
    app.state.api_keys = keys
    protected: dict[str, Any] = {}
    if keys is not None:
        protected = {
            "dependencies": [Depends(api_key_dependency(keys))],
            "responses": {
                401: {"description": "missing or unknown API key"},
                403: {"description": "the API key lacks the scope (`write` for any method but GET and HEAD)"},
            },
        }
    app.include_router(_health_router(settings.service_name))
    app.include_router(_ops_router(), **protected)
    for router in routers:
        app.include_router(router, **protected)
    for router in public_routers:
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if keys is not None:
        app.add_middleware(PiiMaskMiddleware)
    app.add_middleware(_MetricsMiddleware, service=settings.service_name)
    return app
