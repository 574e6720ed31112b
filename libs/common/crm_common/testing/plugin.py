"""Pytest plugin (loaded with -p crm_common.testing.plugin): real PostgreSQL and broker per session.

Fixtures:
* `pg_server`: a PostgreSQL server started once per session (fsync off), in a temp directory.
* `broker`: the Tansu broker started once per session (`broker.bootstrap`).
* `make_database(package=None)`: a fresh database per call; cloned from a template migrated once
  per session when `package` (a service package with `migrations/`) is given. Returns its URL.
* `topic_prefix`: a unique topic prefix for this test, with every crm topic created under it.
* `clock`: a ManualClock starting 2026-01-05 12:00 UTC.

CRM_API_KEYS is set to `helpers.TEST_API_KEY` for the run, so every service's settings (in-process
or a `ServiceProcess`) accept it, and `run_app` clients send it.

Set CRM_TEST_KEEP=1 to keep the temp directory after the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from crm_common.clock import ManualClock
from crm_common.infra import BrokerServer, PostgresServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS
from crm_common.testing.helpers import TEST_API_KEY, unique

TEST_PARTITIONS = 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap_stale_runs() -> None:
    """Stop servers left behind by earlier test runs that were killed before their teardown."""
    for owner in Path(tempfile.gettempdir()).glob("crm-test-*/owner.pid"):
        try:
            if _alive(int(owner.read_text())):
                continue
        except (OSError, ValueError):
            continue
        run_dir = owner.parent
        broker_pid = run_dir / "broker.pid"
        if broker_pid.exists():
            try:
                os.kill(int(broker_pid.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if (run_dir / "pg").exists():
            PostgresServer(run_dir / "pg", 0).kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    _reap_stale_runs()
    # Set, not defaulted: a developer's own CRM_API_KEYS must not change what the tests see.
    os.environ["CRM_API_KEYS"] = TEST_API_KEY

    # A SIGTERM (e.g. from `timeout`) becomes an exception so fixtures still stop their servers.
    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _term)


@pytest.fixture(scope="session")
def crm_tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="crm-test-"))
    os.chmod(path, 0o755)
    (path / "owner.pid").write_text(str(os.getpid()))
    yield path
    if not os.environ.get("CRM_TEST_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(crm_tmpdir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(crm_tmpdir / "pg", free_port(), durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker(crm_tmpdir: Path) -> Iterator[BrokerServer]:
    server = BrokerServer(free_port(), log_path=crm_tmpdir / "broker.log")
    server.start()
    assert server.proc is not None
    (crm_tmpdir / "broker.pid").write_text(str(server.proc.pid))
    yield server
    server.stop()


_templates: dict[str, str] = {}
_template_lock = asyncio.Lock()


@asynccontextmanager
async def database_maker(pg_server: PostgresServer) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`make(package)`: a new database migrated for the package (copied from a migrated template, so
    each costs a file copy, not a migration run), or an empty one without a package; every database
    made is dropped when the block ends. The `make_database` fixture, and module-scoped fixtures of
    their own (the scenarios', the console's), use it."""
    created: list[str] = []

    async def _make(package: str | None = None) -> str:
        admin = await asyncpg.connect(pg_server.admin_url)
        try:
            template = None
            if package:
                async with _template_lock:
                    template = _templates.get(package)
                    if template is None:
                        template = f"tmpl_{package}"
                        await admin.execute(f'DROP DATABASE IF EXISTS "{template}"')
                        await admin.execute(f'CREATE DATABASE "{template}"')
                        await upgrade_async(package, pg_server.url(template))
                        _templates[package] = template
            name = unique("db_")
            if template:
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                await admin.execute(f'CREATE DATABASE "{name}"')
            created.append(name)
            return pg_server.url(name)
        finally:
            await admin.close()

    try:
        yield _make
    finally:
        admin = await asyncpg.connect(pg_server.admin_url)
        try:
            for name in created:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture(loop_scope="session")
async def make_database(pg_server: PostgresServer) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    async with database_maker(pg_server) as make:
        yield make


@pytest_asyncio.fixture(loop_scope="session")
async def topic_prefix(broker: BrokerServer) -> str:
    prefix = unique("t") + "."
    await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=TEST_PARTITIONS)
    return prefix


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))


@pytest.fixture
def service_env(broker: BrokerServer, topic_prefix: str) -> dict[str, str]:
    """Environment for a service process or settings object on the test stack."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "CRM_TOPIC_PREFIX": topic_prefix,
        "CRM_LOG_JSON": "false",
        "CRM_API_KEYS": TEST_API_KEY,
    }
