"""Durable acceptance: a broker outage and a crashed ingest process lose nothing and double nothing."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from crm_common.infra import BrokerServer, free_port
from crm_common.kafka import ensure_topics
from crm_common.settings import ALL_TOPICS
from crm_common.testing.helpers import ServiceProcess, eventually, read_topic, run_app
from ingest.app import create_app

from .conftest import POS_KEY, ingest_settings
from .factories import purchase


async def test_events_accepted_while_broker_is_down_are_delivered_when_it_is_back(
    ingest_db, topic_prefix, clock, crm_tmpdir
):
    url, _ = ingest_db
    port = free_port()
    own_broker = BrokerServer(port, log_path=crm_tmpdir / f"broker-{port}.log")
    own_broker.start()
    topics = [topic_prefix + t for t in ALL_TOPICS]
    await ensure_topics(own_broker.bootstrap, topics, partitions=3)
    topic = topic_prefix + "crm.events.v1"
    app = create_app(ingest_settings(url, own_broker.bootstrap, topic_prefix), clock=clock)
    auth = {"Authorization": f"Bearer {POS_KEY}"}
    try:
        async with run_app(app) as client:
            assert (
                await client.post("/v1/events", json=purchase("up-1", occurred_at=clock.now()), headers=auth)
            ).status_code == 202
            await eventually(lambda: app.state.runtime.relays[0].published >= 1, what="published while up")
            own_broker.stop()

            batch = {
                "events": [purchase(f"while-down-{i}", customer_id=f"c{i}", occurred_at=clock.now()) for i in range(5)]
            }
            r = await client.post("/v1/events", json=batch, headers=auth)
            assert r.status_code == 202 and r.json()["accepted"] == 5
            relay = app.state.runtime.relays[0]
            # The pass in flight fails once the producer gives the batch up (request timeout).
            await eventually(lambda: relay.failing, timeout=40, what="relay pass failed")
            assert relay.published == 1

            # The embedded broker keeps topics in memory: a new one comes back empty.
            own_broker = BrokerServer(port, log_path=crm_tmpdir / f"broker-{port}.log")
            own_broker.start()
            await ensure_topics(own_broker.bootstrap, topics, partitions=3)
            await eventually(
                lambda: app.state.runtime.relays[0].published >= 6, timeout=60, what="delivered after restart"
            )
            got = await read_topic(own_broker.bootstrap, topic, min_count=5)
            assert sorted(m["event_id"] for m in got) == [f"while-down-{i}" for i in range(5)]
    finally:
        own_broker.stop()


async def test_event_answered_202_is_delivered_once_after_kill_9_and_restart(ingest_db, broker, topic_prefix):
    url, _ = ingest_db
    env = {
        "INGEST_DATABASE_URL": url,
        "CRM_TOPIC_PREFIX": topic_prefix,
        "CRM_LOG_JSON": "false",
        # The first process cannot reach any broker, so the kill lands between the 202 and the publish.
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
    }
    first = ServiceProcess("ingest", free_port(), env)
    await asyncio.to_thread(first.start)
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            from datetime import UTC, datetime

            now = datetime.now(UTC)
            r = await client.post(
                "/v1/events",
                json={"events": [purchase(f"crash-{i}", customer_id=f"c{i}", occurred_at=now) for i in range(3)]},
                headers={"Authorization": f"Bearer {POS_KEY}"},
            )
            assert r.status_code == 202 and r.json()["accepted"] == 3
    finally:
        first.kill()
    topic = topic_prefix + "crm.events.v1"
    assert await read_topic(broker.bootstrap, topic, timeout=1) == []

    second = ServiceProcess("ingest", free_port(), {**env, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap})
    await asyncio.to_thread(second.start)
    try:
        got = await read_topic(broker.bootstrap, topic, min_count=3, timeout=30, idle=1.5)
        assert Counter(m["id"] for m in got) == Counter({f"pos:crash-{i}": 1 for i in range(3)})
    finally:
        await asyncio.to_thread(second.stop)
