"""The outbox relays of a service on an event loop of their own, in one thread.

A relay pass is a handful of round trips (lock, fetch, send and its acks, delete, commit). On the
service's own loop each resumption waits behind whatever HTTP requests and consumer batches are
ready to run, so under load a pass of a few milliseconds of work takes a few hundred: ingest at
500 single-event requests a second measured 27 ms for the lock, 60 for the fetch, 86 for the send
and 31 for delete and commit, and the relay (always busy) put 200 ms of median latency between a
202 and the event on the topic. In a thread of their own the relays wait for the GIL (released at
least every 5 ms) instead of for a queue of request handlers.

The thread owns what a relay touches: an engine and a producer made on its loop (asyncpg and
aiokafka objects belong to the loop that made them). Workers are woken from any thread
(`Worker.wake` hands the wake-up to the worker's own loop). Stopping drains the relays as before,
then closes the thread's producer and engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from crm_common.db import create_engine, create_sessionmaker
from crm_common.kafka import make_producer
from crm_common.outbox import OutboxRelay
from crm_common.settings import BaseServiceSettings
from crm_common.worker import Worker

log = logging.getLogger(__name__)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, as uvicorn runs the service loop: the relays' sends and commits cost less."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class RelayThread:
    """Runs the given relay workers on a private loop; start and stop from the service's loop."""

    def __init__(self, settings: BaseServiceSettings) -> None:
        self.settings = settings
        self.relays: list[tuple[OutboxRelay, Worker]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None

    def add(self, relay: OutboxRelay, worker: Worker) -> None:
        self.relays.append((relay, worker))

    def start(self) -> None:
        if self._thread is not None or not self.relays:
            return
        self._thread = threading.Thread(target=self._main, name="relays", daemon=True)
        self._thread.start()
        self._started.wait(30)

    def _main(self) -> None:
        loop = _new_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            log.exception("the relay thread stopped on an error")
        finally:
            loop.close()

    async def _serve(self) -> None:
        s = self.settings
        self._stopping = asyncio.Event()
        engine = create_engine(
            s.database_url, pool_size=2, command_timeout_s=s.db_command_timeout_s, plan_cache_mode=s.db_plan_cache_mode
        )
        producer = make_producer(
            s.kafka_bootstrap_servers,
            enable_idempotence=s.kafka_enable_idempotence,
            client_id=f"{s.service_name}-relay",
        )
        sessionmaker = create_sessionmaker(engine)
        for relay, _ in self.relays:
            relay.sessionmaker = sessionmaker
            relay.producer = producer
        self._started.set()
        try:
            if await self._start_producer(producer):
                for _, worker in self.relays:
                    worker.start()
                await self._stopping.wait()
                await asyncio.gather(*(w.stop() for _, w in self.relays), return_exceptions=True)
                await producer.stop()
        finally:
            await engine.dispose()

    async def _start_producer(self, producer: Any) -> bool:
        """Start the producer, retrying while the broker is away; False when asked to stop first."""
        assert self._stopping is not None
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await producer.start()
            except Exception as exc:
                log.warning("relays: broker not reachable (%r); retrying in %.1f s", exc, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5)
                continue
            return True
        return False

    async def stop(self, timeout_s: float = 60) -> None:
        """Drain and stop the relays (bounded by each worker's stop timeout), then join the thread."""
        thread, loop, stopping = self._thread, self.loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            log.warning("the relay thread did not stop within %.0f s", timeout_s)
        self._thread = None
