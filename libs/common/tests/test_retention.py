"""Inbox retention: every service's runtime sweeps message ids older than inbox_retention_days, in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from crm_common.clock import ManualClock
from crm_common.retention import INBOX_SWEEP, delete_in_batches
from crm_common.service import ServiceRuntime
from crm_common.settings import BaseServiceSettings


@pytest_asyncio.fixture(loop_scope="session")
async def runtime(db, broker, clock: ManualClock) -> AsyncIterator[ServiceRuntime]:
    url, _ = db
    settings = BaseServiceSettings(
        service_name="retention",
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        inbox_retention_days=30,
        retention_batch_size=3,
        log_json=False,
    )
    runtime = ServiceRuntime(settings, clock=clock)
    yield runtime
    await runtime.http.aclose()
    await runtime.engine.dispose()


async def add_inbox_rows(runtime: ServiceRuntime, consumer: str, ages_days: list[float]) -> None:
    """One inbox row per age, processed that many days before the clock's now."""
    now = runtime.clock.now()
    async with runtime.sessionmaker() as s:
        await s.execute(
            text(
                "INSERT INTO inbox (consumer, message_id, processed_at) "
                "SELECT :c, 'm-' || i, t FROM unnest(CAST(:times AS timestamptz[])) WITH ORDINALITY AS x(t, i)"
            ),
            {"c": consumer, "times": [now - timedelta(days=d) for d in ages_days]},
        )
        await s.commit()


async def inbox_ids(runtime: ServiceRuntime) -> set[tuple[str, str]]:
    async with runtime.sessionmaker() as s:
        return {(r[0], r[1]) for r in await s.execute(text("SELECT consumer, message_id FROM inbox"))}


async def test_every_service_runtime_registers_the_inbox_sweep(runtime):
    assert INBOX_SWEEP in runtime.sweeps
    interval, _ = runtime.sweeps[INBOX_SWEEP]
    assert interval == runtime.settings.retention_sweep_interval_s == 3600


async def test_inbox_rows_older_than_the_retention_are_deleted_in_batches_and_newer_kept(runtime, clock):
    # 9 rows past 30 days, deleted 3 per transaction.
    await add_inbox_rows(runtime, "loyalty-events", [45, 40, 35, 31, 30.5, 30.01, 100, 400, 29.9, 5, 0])
    await add_inbox_rows(runtime, "offers-events", [31, 1])
    assert await runtime.run_sweep(INBOX_SWEEP) == 9
    assert await inbox_ids(runtime) == {
        ("loyalty-events", "m-9"),
        ("loyalty-events", "m-10"),
        ("loyalty-events", "m-11"),
        ("offers-events", "m-2"),
    }
    assert await runtime.run_sweep(INBOX_SWEEP) == 0

    # A day later the row processed 29.9 days ago is past 30 days too.
    clock.advance(days=1)
    assert await runtime.run_sweep(INBOX_SWEEP) == 1
    assert ("loyalty-events", "m-9") not in await inbox_ids(runtime)
    assert len(await inbox_ids(runtime)) == 3


async def test_each_batch_commits_in_its_own_transaction(runtime):
    await add_inbox_rows(runtime, "c", [40] * 7)
    txids: list[int] = []

    async def step(conn: AsyncConnection, limit: int) -> int:
        txids.append((await conn.execute(text("SELECT txid_current()"))).scalar_one())
        result = await conn.execute(
            text(
                "DELETE FROM inbox WHERE (consumer, message_id) IN "
                "(SELECT consumer, message_id FROM inbox LIMIT :limit)"
            ),
            {"limit": limit},
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async with runtime.sessionmaker() as session:
        assert await delete_in_batches(session=session, step=step, batch_size=3) == 7
        # Committed batch by batch: another connection sees the deletes before this session ends.
        async with runtime.engine.connect() as other:
            assert (await other.execute(text("SELECT count(*) FROM inbox"))).scalar_one() == 0
    assert len(txids) == 3 and len(set(txids)) == 3


async def test_inbox_retention_is_one_shared_setting_with_a_30_day_default(monkeypatch):
    assert BaseServiceSettings().inbox_retention_days == 30
    monkeypatch.setenv("CRM_INBOX_RETENTION_DAYS", "45")
    assert BaseServiceSettings().inbox_retention_days == 45
