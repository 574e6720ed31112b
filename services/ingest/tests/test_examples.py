"""The example bodies of docs/examples (the README's curl) are accepted and published."""

from __future__ import annotations

from pathlib import Path

import orjson
from crm_common.testing.helpers import read_topic

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


async def test_readme_purchase_example_is_accepted_and_on_the_events_topic(ingest):
    r = await ingest.client.post(
        "/v1/events",
        content=(EXAMPLES / "purchase.json").read_bytes(),
        headers={**ingest.auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 1
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1)
    assert got[0]["id"] == "pos:pos-0001-20260105-000123"
    assert got[0]["_key"] == "cust-1001"


async def test_example_batch_replay_and_key_bodies_are_valid(ingest):
    batch = await ingest.client.post(
        "/v1/events",
        content=(EXAMPLES / "batch.json").read_bytes(),
        headers={**ingest.auth, "Content-Type": "application/json"},
    )
    assert batch.status_code == 202 and batch.json()["rejected"] == 0, batch.text
    replay = await ingest.client.post(
        "/v1/replay", json=orjson.loads((EXAMPLES / "replay.json").read_bytes()), headers=ingest.auth
    )
    assert replay.status_code == 202 and replay.json()["replayed"] == 1  # the refund
    key = await ingest.client.post(
        "/v1/keys", json=orjson.loads((EXAMPLES / "key.json").read_bytes()), headers=ingest.auth
    )
    assert key.status_code == 201
