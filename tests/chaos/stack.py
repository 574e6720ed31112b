"""The whole pipeline as separate processes under the devstack's supervisor, and the faults it suffers.

Its own PostgreSQL and broker (the chaos pauses and kills them, so not the session's shared ones),
the five services as `crm_common.serve` processes under `crm_common.supervisor.Supervisor` (a
service killed with -9 is restarted exactly as under `make run`), loopback SMS and push providers
in this process (scriptable: failing with 500, hanging past the notifier's timeout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import asyncpg

from crm_common.devstack import wait_ready
from crm_common.infra import BrokerServer, PostgresServer, free_port, port_open
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.recovery import BrokerRecovery, BrokerWatch
from crm_common.settings import ALL_TOPICS
from crm_common.sinks import LoopbackProvider
from crm_common.supervisor import Supervisor
from crm_common.testing.helpers import TEST_API_KEY

SERVICES = ("ingest", "segmentation", "loyalty", "offers", "notifier")
INGEST_KEY = "chaos-pos-key"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
# The notifier's provider timeout in the run; a hanging provider answers later than this.
PROVIDER_TIMEOUT_S = 3.0


def say(msg: str) -> None:
    print(f"[chaos] {msg}", flush=True)


def _sweeps(service: str) -> dict[str, str]:
    """Sweeps off (the run drives the clock-free load itself), but for the notifier's: its
    `release_stale_leases` is how messages claimed by a dispatcher that was killed mid-send go back
    to the queue (the recovery kill -9s every service at once), with a lease short enough for a run."""
    if service == "notifier":
        return {"NOTIFIER_SWEEPS_ENABLED": "true", "NOTIFIER_DISPATCH_LEASE_S": "20"}
    return {f"{service.upper()}_SWEEPS_ENABLED": "false"}


class ChaosStack:
    def __init__(self, tmp: Path, *, partitions: int = 3) -> None:
        self.tmp = tmp
        self.partitions = partitions
        self.pg = PostgresServer(tmp / "pg", free_port(), durable=False)
        self.broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
        self.sms = LoopbackProvider()
        self.push = LoopbackProvider()
        self.ports = {s: free_port() for s in SERVICES}
        self.urls = {s: f"http://127.0.0.1:{p}" for s, p in self.ports.items()}
        self.sup = Supervisor(say=lambda m: say(f"supervisor: {m}"), pid_dir=tmp / "pids")
        self._logs: list[IO[bytes]] = []
        self._stepper: asyncio.Task[None] | None = None
        # The broker is a child of the supervisor too (restarted on its port, empty); the watch
        # detects that it lost its data and recovers (crm_common.recovery), as under `make run`.
        self.recovery = BrokerRecovery(
            bootstrap=self.broker.bootstrap,
            topics=list(ALL_TOPICS),
            partitions=partitions,
            ingest_url=self.urls["ingest"],
            ingest_key=INGEST_KEY,
            outbox_urls={s: self.urls[s] for s in SERVICES if s != "ingest"},
            ops_key=TEST_API_KEY,
            restart_services=self.restart_services,
            say=lambda m: say(f"recovery: {m}"),
        )
        self._watching = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.pg.start()
        broker_log = open(self.tmp / "broker.log", "ab")
        self._logs.append(broker_log)
        self.sup.add("broker", self.broker.command(), stdout=broker_log)
        self.broker.wait_listening()
        self.sms.start()
        self.push.start()
        admin = await asyncpg.connect(self.pg.admin_url)
        try:
            for s in SERVICES:
                await admin.execute(f'CREATE DATABASE "{s}"')
        finally:
            await admin.close()
        for s in SERVICES:  # one at a time: Alembic's context is process-global
            await upgrade_async(s, self.pg.url(s))
        await self._add_ingest_key()
        await ensure_topics(self.broker.bootstrap, list(ALL_TOPICS), partitions=self.partitions)
        env = {**os.environ, **self._env()}
        for s in SERVICES:
            log = open(self.tmp / f"{s}.log", "ab")
            self._logs.append(log)
            self.sup.add(
                s,
                [sys.executable, "-m", "crm_common.serve", s, "--port", str(self.ports[s])],
                {**env, f"{s.upper()}_DATABASE_URL": self.pg.url(s), **_sweeps(s)},
                stdout=log,
            )
        self._stepper = asyncio.create_task(self._step_supervisor())
        for s in SERVICES:
            await self.wait_ready(s, timeout=120)
        watch = BrokerWatch(self.recovery, pid=lambda: self.sup.pid("broker"), port=self.broker.port)
        self._watch = asyncio.create_task(watch.run(self._watching))

    def _env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "CRM_TOPIC_PREFIX": "",
            "CRM_LOG_LEVEL": "WARNING",
            "CRM_LOG_JSON": "false",
            "CRM_API_KEYS": TEST_API_KEY,
            "OFFERS_SEGMENTATION_URL": self.urls["segmentation"],
            "OFFERS_NOTIFIER_URL": self.urls["notifier"],
            "OFFERS_GLOBAL_CONTROL_SHARE": "0",
            "NOTIFIER_SMS_URL": f"{self.sms.url}/v1/sms",
            "NOTIFIER_PUSH_BASE_URL": self.push.url,
            "NOTIFIER_SMS_TIMEOUT_S": str(PROVIDER_TIMEOUT_S),
            "NOTIFIER_PUSH_TIMEOUT_S": str(PROVIDER_TIMEOUT_S),
            "NOTIFIER_QUIET_HOURS_START": "00:00",
            "NOTIFIER_QUIET_HOURS_END": "00:00",
            # A provider outage parks messages; short parks so the run does not wait minutes for them.
            "NOTIFIER_PARK_BASE_S": "1",
            "NOTIFIER_PARK_MAX_S": "4",
            "NOTIFIER_BREAKER_COOLDOWN_S": "3",
            "NOTIFIER_CONTACT_RECHECK_S": "2",
        }

    async def _add_ingest_key(self) -> None:
        from ingest.keys import ensure_key

        await ensure_key(
            self.pg.url("ingest"), INGEST_KEY, name="chaos", scopes=["events:write", "replay"], rate_limit_per_s=1e7
        )

    async def _step_supervisor(self) -> None:
        while True:
            self.sup.step()
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._watching.set()
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._stepper is not None:
            self._stepper.cancel()
            await asyncio.gather(self._stepper, return_exceptions=True)
        self.resume_broker()
        await asyncio.to_thread(self.sup.stop_all, 35, list(SERVICES))
        await asyncio.to_thread(self.sup.stop_all, 10, ["broker"])
        for log in self._logs:
            log.close()
        self.sms.stop()
        self.push.stop()
        self.pg.stop()

    async def wait_ready(self, service: str, timeout: float = 60) -> float:
        """Wait until the service's /readyz answers 200; answer how long it took."""
        took = await wait_ready(self.urls[service], timeout=timeout)
        if took is None:
            raise AssertionError(f"{service} not ready within {timeout} s; log: {self.log_tail(service)}")
        return took

    def log_tail(self, service: str, chars: int = 3000) -> str:
        path = self.tmp / f"{service}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- faults ----------------------------------------------------------------------------------

    def kill(self, service: str) -> int | None:
        """kill -9 of the service's process group; the supervisor starts it again."""
        return self.sup.kill(service, signal.SIGKILL)

    def pause_broker(self) -> None:
        pid = self.sup.pid("broker")
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)

    def resume_broker(self) -> None:
        pid = self.sup.pid("broker") if "broker" in self.sup.children else None
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    async def kill_broker(self, timeout: float = 300) -> float:
        """kill -9 the broker; the supervisor starts it again, empty, on its port, and the watch
        recovers. Answers the seconds until the recovery was done."""
        started, before = time.monotonic(), len(self.recovery.recoveries)
        self.sup.kill("broker", signal.SIGKILL)
        while len(self.recovery.recoveries) == before:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no recovery within {timeout} s of the broker's kill")
            await asyncio.sleep(0.2)
        return time.monotonic() - started

    async def restart_services(self) -> None:
        """kill -9 every service (the supervisor restarts them) and wait until they are ready again."""
        for s in SERVICES:
            self.kill(s)
        await asyncio.sleep(1)
        for s in SERVICES:
            await self.wait_ready(s, timeout=120)

    async def refuse_database(self, seconds: float) -> None:
        """PostgreSQL refuses the five services' connections for `seconds`: new ones are refused
        (ALLOW_CONNECTIONS false) and the open ones terminated, then both allowed again."""
        admin = await asyncpg.connect(self.pg.admin_url)
        try:
            for s in SERVICES:
                await admin.execute(f'ALTER DATABASE "{s}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY($1::text[])",
                list(SERVICES),
            )
            await asyncio.sleep(seconds)
        finally:
            for s in SERVICES:
                await admin.execute(f'ALTER DATABASE "{s}" ALLOW_CONNECTIONS true')
            await admin.close()

    @contextmanager
    def provider_failing(self, provider: LoopbackProvider, mode: str) -> Iterator[None]:
        """`500`: every request answered 500; `hang`: answers come after the notifier's timeout."""
        if mode == "500":
            provider.default_status = 500
        else:
            provider.delay_s = PROVIDER_TIMEOUT_S + 2
        try:
            yield
        finally:
            provider.default_status = 200
            provider.delay_s = 0.0

    async def db(self, service: str) -> Any:
        return await asyncpg.connect(self.pg.url(service, driver="postgresql"))

    def alive(self, service: str) -> bool:
        return self.sup.alive(service) and port_open("127.0.0.1", self.ports[service])
