"""The example bodies of docs/examples (the README's curl) are accepted and published."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from crm_common.testing.helpers import read_topic

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"
# The test clock must not be before the latest example (occurred_at may not be in the future).
AFTER_EXAMPLES = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


async def post_example(ingest, name: str):
    return await ingest.client.post(
        "/v1/events",
        content=(EXAMPLES / name).read_bytes(),
        headers={**ingest.auth, "Content-Type": "application/json"},
    )


async def test_readme_purchase_example_is_accepted_and_on_the_events_topic(ingest):
    ingest.clock.set(AFTER_EXAMPLES)
    r = await post_example(ingest, "purchase.json")
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 1
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1)
    assert got[0]["id"] == "pos:pos-0001-20260105-000123"
    assert got[0]["_key"] == "cust-1001"


async def test_every_example_body_is_valid(ingest):
    ingest.clock.set(AFTER_EXAMPLES)
    for path in sorted(EXAMPLES.glob("*.json")):
        if path.name in ("replay.json", "key.json"):
            continue
        r = await post_example(ingest, path.name)
        assert r.status_code == 202 and r.json()["rejected"] == 0, (path.name, r.text)
    replay = await ingest.client.post(
        "/v1/replay", json=orjson.loads((EXAMPLES / "replay.json").read_bytes()), headers=ingest.auth
    )
    assert replay.status_code == 202 and replay.json()["replayed"] == 1  # the purchase
    key = await ingest.client.post(
        "/v1/keys", json=orjson.loads((EXAMPLES / "key.json").read_bytes()), headers=ingest.auth
    )
    assert key.status_code == 201
