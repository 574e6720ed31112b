"""Helpers for tests: run an app in-process, read topics, wait for conditions, run service processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from email import message_from_bytes
from email import policy as email_policy
from typing import Any, TypeVar

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastapi import FastAPI

from crm_common import serde
from crm_common.infra import free_port, port_open
from crm_common.settings import BaseServiceSettings

# The ops API key of the test harness: the plugin puts it in CRM_API_KEYS for the whole run.
TEST_API_KEY = "crm-test-api-key"
TEST_AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}

SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)


def stack_settings(settings_cls: type[SettingsT], *, database_url: str, bootstrap: str, **overrides: Any) -> SettingsT:
    """A service's settings on the test stack: no consumers or sweeps unless `overrides` ask, plain logs."""
    values: dict[str, Any] = {"consumers_enabled": False, "sweeps_enabled": False, "log_json": False, **overrides}
    return settings_cls(database_url=database_url, kafka_bootstrap_servers=bootstrap, **values)


@asynccontextmanager
async def run_app(
    app: FastAPI, base_url: str = "http://test", *, headers: Mapping[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an httpx client talking to it in-process.

    The client sends `headers` with every request; by default the test API key when the app
    requires one (every service but ingest), nothing otherwise. `headers={}` sends no key.
    """
    if headers is None:
        headers = TEST_AUTH if getattr(app.state, "api_keys", None) is not None else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url, timeout=30, headers=headers) as client:
            yield client


async def eventually(
    check: Callable[[], Any], *, timeout: float = 20, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Await `check()` (sync or async) until it returns a truthy value; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
        await asyncio.sleep(interval)


async def read_topic(
    bootstrap: str, topic: str, *, min_count: int = 0, timeout: float = 15, idle: float = 0.5
) -> list[dict[str, Any]]:
    """Read a topic from the beginning; stop once `min_count` messages arrived and it is idle."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
            for msgs in batch.values():
                for m in msgs:
                    value = serde.loads(m.value)
                    if isinstance(value, dict):
                        value.setdefault("_key", m.key.decode() if m.key else None)
                        value.setdefault("_partition", m.partition)
                    out.append(value)
                    last_new = time.monotonic()
            if len(out) >= min_count and time.monotonic() - last_new >= idle:
                break
        return out
    finally:
        await consumer.stop()


async def publish(bootstrap: str, topic: str, messages: list[dict[str, Any]], key: str = "customer_id") -> None:
    """Publish JSON messages keyed by `message[key]`, waiting for acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=2)
    await producer.start()
    try:
        futs = [await producer.send(topic, value=serde.dumps(m), key=str(m.get(key, "")).encode()) for m in messages]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


class Mailbox:
    """An aiosmtpd handler that keeps every accepted message (the SMTP server of e-mail tests)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(message_from_bytes(envelope.content, policy=email_policy.default))
        return "250 OK"

    def to(self, address: str) -> list[Any]:
        return [m for m in list(self.messages) if address in str(m["To"])]


@contextmanager
def smtp_mailbox() -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server on a free port keeping what it accepts: `with smtp_mailbox() as (box, port)`."""
    from aiosmtpd.controller import Controller  # a test dependency only

    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class ServiceProcess:
    """A service running in its own process (uvicorn), for crash tests with kill -9."""

    def __init__(self, service: str, port: int, env: dict[str, str]) -> None:
        self.service = service
        self.port = port
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crm_common.serve", self.service, "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.service} did not open port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no flush, as a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def event_message(
    type_: str,
    customer_id: str,
    at: datetime,
    properties: dict[str, Any],
    *,
    event_id: str | None = None,
    source: str = "pos",
) -> dict[str, Any]:
    """An event message as ingest publishes it on crm.events.v1 (for tests that skip ingest)."""
    event_id = event_id or uuid.uuid4().hex
    return {
        "id": f"{source}:{event_id}",
        "source": source,
        "event_id": event_id,
        "type": type_,
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "received_at": at.isoformat(),
        "properties": properties,
    }


# Every variable offers sends with a message (offers.evaluation.personalise); a test template
# declares them so that any campaign's message renders.
OFFER_VARIABLES = [
    "first_name",
    "campaign",
    "offer_kind",
    "discount",
    "product_name",
    "product_sku",
    "category",
    "size",
    "color",
    "min_basket",
    "min_quantity",
    "multiplier",
    "coupon_code",
    "valid_until",
    "products",
]


@asynccontextmanager
async def serve_app(app: FastAPI, port: int | None = None, *, lifespan: bool = True) -> AsyncIterator[str]:
    """Serve an app with uvicorn on a loopback port in this event loop; yield its base URL. `lifespan=False`
    for an app whose lifespan already runs (one started by `run_app`, now also to be reached on a port)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, lifespan="on" if lifespan else "off", access_log=False
        )
    )
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for it
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
