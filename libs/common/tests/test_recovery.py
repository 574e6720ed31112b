"""Recovery from a broker that lost its data: detected from the broker's own state, then the outbox republished."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from crm_common.infra import BrokerServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.outbox import enqueue_many
from crm_common.recovery import BrokerRecovery, loss_reason
from crm_common.service import create_service_app
from crm_common.settings import BaseServiceSettings
from crm_common.testing.helpers import TEST_API_KEY, eventually, run_app, serve_app

from .conftest import effect_counts
from .test_consumer import messages, record_effects


def test_loss_reason_names_missing_topics_and_partitions_that_went_backwards():
    recorded = {("t", 0): 5, ("t", 1): 0}
    assert loss_reason(recorded, [], {("t", 0): 5, ("t", 1): 2}) is None
    assert loss_reason({}, [], {}) is None
    assert loss_reason(recorded, ["t"], {}) == "topics missing: t"
    reason = loss_reason(recorded, [], {("t", 0): 1, ("t", 1): 0})
    assert reason is not None and "t[0] at 1, was 5" in reason


async def test_a_broker_killed_and_restarted_empty_is_detected_and_the_outbox_republished(db, tmp_path):
    url, sm = db
    broker = BrokerServer(free_port(), log_path=tmp_path / "broker.log")
    broker.start()
    topics = ["crm.segments.v1", "crm.dlq.v1"]
    await ensure_topics(broker.bootstrap, topics, partitions=3)
    settings = BaseServiceSettings(
        service_name="recoverytest",
        database_url=url,
        kafka_bootstrap_servers=broker.bootstrap,
        sweeps_enabled=False,
        log_json=False,
        outbox_retention_s=3600,
        consumer_retry_backoff_ms=50,
    )

    def configure(runtime):  # type: ignore[no-untyped-def]
        runtime.add_relay()
        runtime.add_consumer("recovery-test", ["crm.segments.v1"], record_effects)

    app = create_service_app(settings=settings, title="recovery test", description="", configure=configure)
    said: list[str] = []
    try:
        async with run_app(app), serve_app(app, lifespan=False) as base:
            runtime = app.state.runtime
            async with sm() as s:
                await enqueue_many(s, [("crm.segments.v1", m["customer_id"], m) for m in messages(30)])
                await s.commit()
            runtime.wake_relays()

            async def applied(n: int) -> bool:
                return len(await effect_counts(sm)) == n

            await eventually(lambda: applied(30), timeout=30, what="30 applied")

            async def restart_consumers() -> None:
                # As a restarted process would: a new member, nothing of the old one's positions.
                old = runtime.consumers.pop()
                await old.stop()
                await runtime.add_consumer("recovery-test", ["crm.segments.v1"], record_effects).start()

            recovery = BrokerRecovery(
                bootstrap=broker.bootstrap,
                topics=topics,
                partitions=3,
                ingest_url=None,
                ingest_key=None,
                outbox_urls={"recoverytest": base},
                ops_key=TEST_API_KEY,
                restart_services=restart_consumers,
                say=said.append,
                now=lambda: datetime.now(UTC),
            )
            recovery.broker_since = datetime.now(UTC) - timedelta(minutes=1)
            await recovery.observe()
            # (Tansu's log end offsets count record batches: the relay sent one per partition.)
            assert sum(v for (t, _), v in recovery.recorded.items() if t == "crm.segments.v1") > 0
            # A broker that did not lose anything is not "recovered".
            assert await recovery.after_restart() is None

            assert broker.proc is not None
            broker.proc.kill()
            broker.proc.wait()
            broker.start()
            recovery.broker_since = datetime.now(UTC) - timedelta(minutes=1)
            done = await recovery.after_restart()
            assert done is not None
            # Clients may have auto-created a topic on the new broker by then: the dead-letter topic is missing.
            assert done.reason.startswith("topics missing: crm.dlq.v1"), done.reason
            assert done.republished == {"recoverytest": 30}

            async def repeats_seen() -> bool:
                return runtime.consumers[0].stats.duplicates >= 30

            await eventually(repeats_seen, timeout=60, what="the 30 republished messages seen as duplicates")
            assert await effect_counts(sm) == {f"m{i}": 1 for i in range(30)}
            # The new broker holds the messages again.
            await recovery.observe()
            assert sum(v for (t, _), v in recovery.recorded.items() if t == "crm.segments.v1") > 0
            assert any("broker lost its data" in m for m in said) and any("recovered:" in m for m in said)
    finally:
        broker.stop()
