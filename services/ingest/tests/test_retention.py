"""How far back ingest reaches: the archive's retention sweep and the earliest `from` of a replay."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from crm_common.retention import INBOX_SWEEP
from crm_common.testing.helpers import run_app
from ingest.app import create_app
from ingest.repository import EventRepository, EventRow
from ingest.retention import ARCHIVE_SWEEP, archive_sweep

from .conftest import POS_KEY, ingest_settings


async def archive_events(sm, *, received_days_ago: dict[str, float], now) -> None:
    """Archive one event per id, received that many days before `now`, each queued for publishing."""
    async with sm() as s:
        repo = EventRepository(s)
        for event_id, days in received_days_ago.items():
            at = now - timedelta(days=days)
            await repo.insert_new(source="pos", received_at=at, rows=[EventRow(event_id, "c1", "purchase", at, b"{}")])
        await s.commit()


async def archived_ids(sm) -> set[str]:
    async with sm() as s:
        return set((await s.execute(text("SELECT event_id FROM events"))).scalars())


async def mark_published(sm, *, keep_pending: set[str] = frozenset()) -> None:
    """Empty the publish queue as the relay would, except for the batches of `keep_pending`."""
    async with sm() as s:
        await s.execute(
            text(
                "DELETE FROM event_pending_batches b WHERE NOT EXISTS (SELECT 1 FROM events e "
                "WHERE e.seq = ANY(b.seqs) AND e.event_id = ANY(CAST(:keep AS text[])))"
            ),
            {"keep": sorted(keep_pending)},
        )
        await s.commit()


async def test_archive_sweep_deletes_published_events_past_the_retention_in_batches(ingest_db, clock):
    url, sm = ingest_db
    now = clock.now()
    old = {f"old-{i}": 400 + i for i in range(1, 6)}
    await archive_events(sm, received_days_ago={**old, "young-1": 399, "young-2": 399.5, "today": 0}, now=now)
    await mark_published(sm, keep_pending={"old-3"})
    sweep = archive_sweep(ingest_settings(url, "127.0.0.1:1", "", retention_batch_size=2))

    async with sm() as s:
        assert await sweep(s, clock.now()) == 4
    # Still waiting to be published: kept until the relay has sent it, however old.
    assert await archived_ids(sm) == {"old-3", "young-1", "young-2", "today"}
    await mark_published(sm)
    async with sm() as s:
        assert await sweep(s, clock.now()) == 1
    assert await archived_ids(sm) == {"young-1", "young-2", "today"}

    clock.advance(days=1, hours=1)
    async with sm() as s:
        assert await sweep(s, clock.now()) == 2
    assert await archived_ids(sm) == {"today"}


async def test_ingest_registers_the_archive_and_inbox_sweeps_runnable_on_demand(ingest):
    await archive_events(ingest.sessionmaker, received_days_ago={"ancient": 500}, now=ingest.clock.now())
    await mark_published(ingest.sessionmaker)
    pipeline = (await ingest.client.get("/v1/ops/pipeline", headers=ingest.auth)).json()
    assert {ARCHIVE_SWEEP, INBOX_SWEEP} <= set(pipeline["sweeps"])
    r = await ingest.client.post(f"/v1/ops/sweeps/{ARCHIVE_SWEEP}", headers=ingest.auth)
    assert r.status_code == 200 and r.json() == {"sweep": ARCHIVE_SWEEP, "ran": True, "result": 1}
    assert (await ingest.client.get("/v1/events/pos/ancient", headers=ingest.auth)).status_code == 404


async def replay(ingest, client, start, *, by: str = "received_at"):
    return await client.post(
        "/v1/replay",
        json={"from": start.isoformat(), "to": ingest.clock.now().isoformat(), "by": by},
        headers=ingest.auth,
    )


async def test_replay_past_what_the_inboxes_remember_is_422_naming_from_and_the_earliest_time(ingest):
    now = ingest.clock.now()
    earliest = now - timedelta(days=30)
    refused = await replay(ingest, ingest.client, earliest - timedelta(seconds=1))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "validation_error"
    [detail] = error["details"]
    assert detail["loc"] == ["body", "from"] and detail["earliest"] == earliest.isoformat()
    assert f"the earliest allowed is {earliest.isoformat()}" in detail["msg"]
    assert "inboxes remember deliveries for 30 days" in detail["msg"]
    assert (await replay(ingest, ingest.client, earliest)).status_code == 202

    # By occurred_at the limit is 5 minutes later: an event may say it occurred 5 minutes after
    # it was received, so one that occurred at the limit may have been received before it.
    by_occurrence = await replay(ingest, ingest.client, earliest, by="occurred_at")
    assert by_occurrence.status_code == 422
    assert by_occurrence.json()["error"]["details"][0]["earliest"] == (earliest + timedelta(minutes=5)).isoformat()
    ok = await replay(ingest, ingest.client, earliest + timedelta(minutes=5), by="occurred_at")
    assert ok.status_code == 202

    # The limit moves with time: what was allowed a week ago is not any more.
    ingest.clock.advance(days=7)
    assert (await replay(ingest, ingest.client, earliest)).status_code == 422


async def test_replay_past_the_archive_retention_is_422_saying_so(ingest_db, broker, topic_prefix, clock):
    url, _ = ingest_db
    settings = ingest_settings(url, broker.bootstrap, topic_prefix, archive_retention_days=10)
    async with run_app(create_app(settings, clock=clock)) as client:
        now = clock.now()
        body = {"from": (now - timedelta(days=11)).isoformat(), "to": now.isoformat()}
        r = await client.post("/v1/replay", json=body, headers={"Authorization": f"Bearer {POS_KEY}"})
        assert r.status_code == 422, r.text
        [detail] = r.json()["error"]["details"]
        assert detail["loc"] == ["body", "from"] and "the archive keeps events for 10 days" in detail["msg"]
        assert detail["earliest"] == (now - timedelta(days=10)).isoformat()
