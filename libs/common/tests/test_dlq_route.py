"""`GET /v1/ops/dlq`: the latest dead letters of the service's own consumers, each with its error."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.consumer import PoisonMessage, Record
from crm_common.service import create_service_app
from crm_common.settings import BaseServiceSettings
from crm_common.testing.helpers import eventually, publish, run_app

from .test_consumer import messages, record_effects


async def refuse_odd(session: AsyncSession, records: list[Record]) -> None:
    odd = [r for r in records if int(r.value["n"]) % 2]
    if odd:
        raise PoisonMessage(f"odd number {odd[0].value['n']}")
    await record_effects(session, records)


async def test_the_dlq_route_lists_the_services_dead_letters_with_their_errors_newest_first(broker, topic_prefix, db):
    url, _ = db
    settings = BaseServiceSettings(
        service_name="dlqtest",
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        topic_prefix=topic_prefix,
        sweeps_enabled=False,
        consumer_retry_backoff_ms=10,
        log_json=False,
    )

    def configure(runtime):  # type: ignore[no-untyped-def]
        runtime.add_consumer("dlq-test", ["crm.events.v1"], refuse_odd)

    app = create_service_app(settings=settings, title="dlq test", description="", configure=configure)
    # An entry of another service's consumer on the same topic: not this service's to show.
    await publish(
        broker.bootstrap,
        topic_prefix + "crm.dlq.v1",
        [{"id": "dlq:other", "consumer": "someone-else", "error": "not ours", "customer_id": "c0"}],
    )
    async with run_app(app) as client:
        await publish(broker.bootstrap, topic_prefix + "crm.events.v1", messages(6))

        async def three_entries() -> list[dict] | None:
            r = await client.get("/v1/ops/dlq")
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            return items if len(items) == 3 else None

        items = await eventually(three_entries, timeout=30, what="three dead letters")
        assert sorted(e["message_id"] for e in items) == ["m1", "m3", "m5"]
        assert {e["error"] for e in items} == {f"PoisonMessage: odd number {n}" for n in (1, 3, 5)}
        assert {e["consumer"] for e in items} == {topic_prefix + "dlq-test"}
        assert [e["failed_at"] for e in items] == sorted((e["failed_at"] for e in items), reverse=True)
        assert set(items[0]) == {
            "id",
            "consumer",
            "source_topic",
            "partition",
            "offset",
            "message_id",
            "error",
            "failed_at",
        }
        assert items[0]["source_topic"] == topic_prefix + "crm.events.v1"
        limited = (await client.get("/v1/ops/dlq", params={"limit": 1})).json()["items"]
        assert limited == items[:1]
        assert (await client.get("/v1/ops/dlq", params={"limit": 0})).status_code == 422
