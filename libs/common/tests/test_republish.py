"""`POST /v1/ops/republish`: sent outbox rows go out again, and the consumers' inboxes make the repeats harmless."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from crm_common.outbox import enqueue_many
from crm_common.service import create_service_app
from crm_common.settings import BaseServiceSettings
from crm_common.testing.helpers import eventually, run_app

from .conftest import effect_counts
from .test_consumer import messages, record_effects


def _settings(url: str, bootstrap: str, prefix: str, **kw: object) -> BaseServiceSettings:
    return BaseServiceSettings(
        service_name="republishtest",
        database_url=url,
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        sweeps_enabled=False,
        log_json=False,
        **kw,
    )


def _relay_app(url: str, bootstrap: str, prefix: str, *, outbox_retention_s: int):  # type: ignore[no-untyped-def]
    """A service app with only an outbox relay, keeping sent rows for `outbox_retention_s`."""

    def configure(runtime):  # type: ignore[no-untyped-def]
        runtime.add_relay()

    settings = _settings(url, bootstrap, prefix, outbox_retention_s=outbox_retention_s)
    return create_service_app(settings=settings, title="republish test", description="", configure=configure)


async def test_republish_sends_the_window_again_and_the_consumer_applies_nothing_twice(broker, topic_prefix, db):
    url, sm = db
    settings = _settings(url, broker.bootstrap, topic_prefix, outbox_retention_s=3600)

    def configure(runtime):  # type: ignore[no-untyped-def]
        runtime.add_relay()
        runtime.add_consumer("republish-test", ["crm.segments.v1"], record_effects)

    app = create_service_app(settings=settings, title="republish test", description="", configure=configure)
    async with run_app(app) as client:
        runtime = app.state.runtime
        before = datetime.now(UTC) - timedelta(seconds=5)
        async with sm() as s:
            await enqueue_many(s, [("crm.segments.v1", m["customer_id"], m) for m in messages(20)])
            await s.commit()
        runtime.wake_relays()

        async def applied_all() -> bool:
            return len(await effect_counts(sm)) == 20

        await eventually(applied_all, timeout=30, what="the 20 messages applied")
        async with sm() as s:
            assert (await s.execute(text("SELECT count(sent_at) FROM outbox"))).scalar() == 20
        consumer = runtime.consumers[0]
        duplicates_before = consumer.stats.duplicates

        r = await client.post("/v1/ops/republish", json={"since": before.isoformat()})
        assert r.status_code == 200, r.text
        assert r.json()["republished"] == 20

        async def counted_duplicates() -> bool:
            return consumer.stats.duplicates - duplicates_before >= 20

        await eventually(counted_duplicates, timeout=30, what="the inbox counting the 20 repeats")
        assert await effect_counts(sm) == {f"m{i}": 1 for i in range(20)}
        assert consumer.stats.duplicates - duplicates_before == 20
        assert (await client.get("/v1/ops/pipeline")).json()["outbox_backlog"] == 0

        # A window with nothing sent in it republishes nothing.
        r = await client.post(
            "/v1/ops/republish", json={"since": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
        )
        assert r.json()["republished"] == 0


async def test_republish_refuses_a_bad_missing_or_too_old_since_naming_the_field(broker, topic_prefix, db):
    url, _ = db
    app = _relay_app(url, broker.bootstrap, topic_prefix, outbox_retention_s=600)
    async with run_app(app) as client:
        too_old = (datetime.now(UTC) - timedelta(seconds=700)).isoformat()
        for body in (
            {},
            {"since": "yesterday"},
            {"since": "2026-01-01T00:00:00"},
            {"since": too_old},
            {"since": "9999-12-31T23:00:00-14:00"},
        ):
            r = await client.post("/v1/ops/republish", json=body)
            assert r.status_code == 422, (body, r.text)
            assert any(d["loc"][-1] == "since" for d in r.json()["error"]["details"]), r.text
        r = await client.post("/v1/ops/republish", json={"since": datetime.now(UTC).isoformat()})
        assert r.status_code == 200 and r.json()["republished"] == 0


async def test_republish_is_a_404_without_retention(broker, topic_prefix, db):
    url, _ = db
    app = _relay_app(url, broker.bootstrap, topic_prefix, outbox_retention_s=0)
    async with run_app(app) as client:
        r = await client.post("/v1/ops/republish", json={"since": datetime.now(UTC).isoformat()})
        assert r.status_code == 404, r.text
