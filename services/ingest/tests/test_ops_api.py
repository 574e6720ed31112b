"""Ops on ingest: API keys, replay with downstream idempotency, bootstrap key, database outage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.consumer import ConsumerRunner, Record
from crm_common.db import create_engine, create_sessionmaker, make_base
from crm_common.infra import free_port
from crm_common.kafka import make_producer
from crm_common.migrations import upgrade_async
from crm_common.testing.helpers import eventually, read_topic, run_app
from ingest.app import create_app
from ingest.keys import ensure_bootstrap_key
from ingest.repository import EventRepository, EventRow

from .conftest import ingest_settings
from .factories import custom, purchase


async def test_ops_creates_lists_and_revokes_keys(ingest):
    created = await ingest.client.post(
        "/v1/keys",
        json={"name": "web shop", "source": "site", "scopes": ["events:write"], "rate_limit_per_s": 100},
        headers=ingest.auth,
    )
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["source"] == "site" and key["key"].startswith("crm_") and key["revoked_at"] is None
    listed = (await ingest.client.get("/v1/keys", headers=ingest.auth)).json()
    assert key["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    async with ingest.sessionmaker() as s:
        stored = (await s.execute(text("SELECT key_hash FROM api_keys WHERE name = 'web shop'"))).scalar()
    assert stored and key["key"] not in stored

    now = ingest.clock.now()
    site_event = {
        "event_id": "v-1",
        "type": "site_visit",
        "anonymous_id": "anon-7",
        "occurred_at": now.isoformat(),
        "properties": {"page": "/"},
    }
    ok = await ingest.client.post("/v1/events", json=site_event, headers={"Authorization": f"Bearer {key['key']}"})
    assert ok.status_code == 202, ok.text
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1)
    assert got[0]["_key"] == "anon:anon-7" and got[0]["id"] == "site:v-1"

    revoked = await ingest.client.delete(f"/v1/keys/{key['id']}", headers=ingest.auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = await ingest.client.post(
        "/v1/events", json={**site_event, "event_id": "v-2"}, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert refused.status_code == 401
    assert (
        await ingest.client.delete("/v1/keys/00000000-0000-0000-0000-000000000000", headers=ingest.auth)
    ).status_code == 404
    bad = await ingest.client.post(
        "/v1/keys", json={"name": "x", "source": "moon", "scopes": ["root"]}, headers=ingest.auth
    )
    assert bad.status_code == 422


async def test_bootstrap_key_is_created_once_with_all_scopes(ingest):
    await ensure_bootstrap_key(ingest.url, "dev-pos-key")
    await ensure_bootstrap_key(ingest.url, "dev-pos-key")
    async with ingest.sessionmaker() as s:
        rows = (await s.execute(text("SELECT source, scopes FROM api_keys WHERE name = 'bootstrap'"))).all()
    assert len(rows) == 1 and rows[0][0] == "pos"
    assert sorted(rows[0][1]) == sorted(["events:write", "events:read", "replay", "keys:admin"])
    r = await ingest.post(purchase("boot-1", occurred_at=ingest.clock.now()), key="dev-pos-key")
    assert r.status_code == 202


async def test_replay_republishes_and_downstream_applies_each_event_once(ingest, make_database, broker, topic_prefix):
    # A downstream consumer on the common runtime, with its own database and effects table.
    downstream_url = await make_database()
    engine = create_engine(downstream_url, pool_size=2)
    async with engine.begin() as conn:
        await conn.run_sync(make_base().metadata.create_all)
        await conn.execute(text("CREATE TABLE effects (message_id text NOT NULL)"))
    sm = create_sessionmaker(engine)

    async def record(session: AsyncSession, records: list[Record]) -> None:
        await session.execute(
            text("INSERT INTO effects (message_id) SELECT unnest(CAST(:ids AS text[]))"),
            {"ids": [r.id for r in records]},
        )

    producer = make_producer(broker.bootstrap)
    await producer.start()
    runner = ConsumerRunner(
        name="downstream",
        topics=[ingest.topic],
        handler=record,
        sessionmaker=sm,
        bootstrap_servers=broker.bootstrap,
        producer=producer,
        dlq_topic=topic_prefix + "crm.dlq.v1",
        group_id=topic_prefix + "downstream",
    )
    await runner.start()
    try:
        now = ingest.clock.now()
        early = [purchase(f"rp-{i}", customer_id=f"c{i}", occurred_at=now - timedelta(days=2)) for i in range(4)]
        r = await ingest.post({"events": [*early, custom("rp-custom", occurred_at=now - timedelta(days=2))]})
        assert r.json()["accepted"] == 5
        ingest.clock.advance(hours=1)
        r = await ingest.post(purchase("rp-later", occurred_at=ingest.clock.now()))
        assert r.json()["accepted"] == 1
        await eventually(lambda: runner.stats.applied >= 6, what="first delivery applied")

        # Purchases received in the first hour only.
        replay = await ingest.client.post(
            "/v1/replay",
            json={
                "from": (now - timedelta(minutes=1)).isoformat(),
                "to": (now + timedelta(minutes=30)).isoformat(),
                "types": ["purchase"],
            },
            headers=ingest.auth,
        )
        assert replay.status_code == 202, replay.text
        assert replay.json()["replayed"] == 4 and replay.json()["from"]
        got = await read_topic(ingest.bootstrap, ingest.topic, min_count=10)
        ids = sorted(m["id"] for m in got)
        assert len(ids) == 10 and ids.count("pos:rp-0") == 2 and ids.count("pos:rp-later") == 1
        await eventually(lambda: runner.stats.duplicates >= 4, what="replayed copies seen")
        async with sm() as s:
            counts = dict((await s.execute(text("SELECT message_id, count(*) FROM effects GROUP BY 1"))).all())
        assert len(counts) == 6 and set(counts.values()) == {1}

        by_occurrence = await ingest.client.post(
            "/v1/replay",
            json={
                "from": (now - timedelta(days=3)).isoformat(),
                "to": (now - timedelta(days=1)).isoformat(),
                "by": "occurred_at",
            },
            headers=ingest.auth,
        )
        assert by_occurrence.json()["replayed"] == 5
        backwards = await ingest.client.post(
            "/v1/replay",
            json={"from": now.isoformat(), "to": (now - timedelta(days=1)).isoformat()},
            headers=ingest.auth,
        )
        assert backwards.status_code == 422
    finally:
        await runner.stop()
        await producer.stop()
        await engine.dispose()


async def test_unreachable_database_answers_503_with_retry_after(broker, topic_prefix, clock):
    closed = f"postgresql+asyncpg://crm:crm@127.0.0.1:{free_port()}/ingest"
    app = create_app(ingest_settings(closed, broker.bootstrap, topic_prefix), clock=clock)
    async with run_app(app) as client:
        body = purchase("down-1", occurred_at=clock.now())
        r = await client.post("/v1/events", json=body, headers={"Authorization": "Bearer any-key"})
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "5"
        assert r.json()["error"]["code"] == "unavailable"
        for path in ("/v1/keys", "/v1/events/pos/x"):
            r = await client.get(path, headers={"Authorization": "Bearer any-key"})
            assert r.status_code == 503 and "Retry-After" in r.headers


async def test_database_lost_after_start_answers_503_and_accepts_again_when_back(ingest, pg_server):
    import asyncpg

    now = ingest.clock.now()
    assert (await ingest.post(purchase("before", occurred_at=now))).status_code == 202  # key now cached
    db = ingest.url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server.admin_url)
    try:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db)
        r = await ingest.post(purchase("during", occurred_at=now))
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()
    r = await ingest.post(purchase("during", occurred_at=now))
    assert r.status_code == 202 and r.json()["accepted"] == 1


async def test_replay_with_extreme_or_malformed_ranges_is_4xx_or_empty(ingest):
    cases = [
        {"from": "0001-01-01T00:00:00+14:00", "to": "9999-12-31T23:59:59-14:00"},
        {"from": "0001-01-01T00:00:00Z", "to": "0001-01-02T00:00:00Z"},
        {"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "types": ["teleport"]},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "by": "seq"},
        {"from": "yesterday", "to": "today"},
    ]
    for body in cases:
        r = await ingest.client.post("/v1/replay", json=body, headers=ingest.auth)
        assert r.status_code in (202, 422), (body, r.status_code, r.text[:200])
    r = await ingest.client.post("/v1/replay", json=cases[0], headers=ingest.auth)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"] == ["body", "from"]
    recent = (ingest.clock.now() - timedelta(days=1)).isoformat()
    r = await ingest.client.post("/v1/replay", json={**cases[0], "from": recent}, headers=ingest.auth)
    assert r.status_code == 202 and r.json()["replayed"] == 0


async def test_publish_queue_migration_carries_waiting_events_over(make_database):
    # A database at 0002 with events waiting in the per-event queue keeps them queued at head.
    url = await make_database()
    await upgrade_async("ingest", url, "0002")
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (source, event_id, customer_key, type, occurred_at, received_at, message) "
                    "SELECT 'pos', 'm-' || i, 'c', 'purchase', now(), now(), '{}' FROM generate_series(1, 2500) i"
                )
            )
            await conn.execute(text("INSERT INTO event_pending (seq) SELECT seq FROM events WHERE seq % 2 = 0"))
        await upgrade_async("ingest", url)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT n, seqs FROM event_pending_batches ORDER BY id"))).all()
        assert [n for n, _ in rows] == [1000, 250]
        queued = [seq for _, seqs in rows for seq in seqs]
        assert queued == list(range(2, 2501, 2))
    finally:
        await engine.dispose()


async def test_replay_of_events_still_queued_queues_each_once(make_database):
    url = await make_database("ingest")
    engine = create_engine(url, pool_size=1)
    sm = create_sessionmaker(engine)
    try:
        now = datetime(2026, 5, 1, 12, tzinfo=UTC)
        rows = [EventRow(f"q-{i}", f"c{i}", "purchase", now, b"{}") for i in range(1500)]
        async with sm() as s:
            repo = EventRepository(s)
            assert len(await repo.insert_new(source="pos", received_at=now, rows=rows[:700])) == 700
            assert len(await repo.insert_new(source="pos", received_at=now, rows=rows[700:])) == 800
            await s.commit()
            # Nothing published yet: the replay matches all 1,500 and queues none of them again.
            assert (
                await repo.queue_range(by="received_at", start=now, end=now + timedelta(seconds=1), types=None) == 1500
            )
            await s.commit()
            queued = (await s.execute(text("SELECT n, seqs FROM event_pending_batches ORDER BY id"))).all()
            assert [n for n, _ in queued] == [700, 800]
            # Once published (queue empty), the same replay queues them again, in chunks, in order.
            await s.execute(text("DELETE FROM event_pending_batches"))
            assert (
                await repo.queue_range(by="received_at", start=now, end=now + timedelta(seconds=1), types=None) == 1500
            )
            queued = (await s.execute(text("SELECT n, seqs FROM event_pending_batches ORDER BY id"))).all()
            assert [n for n, _ in queued] == [1000, 500]
            seqs = [seq for _, chunk in queued for seq in chunk]
            assert seqs == sorted(seqs) and len(set(seqs)) == 1500
    finally:
        await engine.dispose()
