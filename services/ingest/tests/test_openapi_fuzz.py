"""Schemathesis over ingest's OpenAPI, against a running ingest process: no input gives a 500."""

from __future__ import annotations

import asyncio

from crm_common.infra import free_port
from crm_common.testing.fuzz import fuzz_openapi
from crm_common.testing.helpers import ServiceProcess

from .conftest import POS_KEY

MAX_EXAMPLES = 30


async def test_fuzzing_the_openapi_finds_no_server_error(ingest_db, service_env):
    url, _ = ingest_db
    proc = ServiceProcess("ingest", free_port(), {**service_env, "INGEST_DATABASE_URL": url})
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(
            fuzz_openapi,
            proc.url,
            max_examples=MAX_EXAMPLES,
            headers={"Authorization": f"Bearer {POS_KEY}"},
            skip_prefixes=(),
        )
    finally:
        await asyncio.to_thread(proc.stop)
    events_calls = sum(n for (label, _), n in seen.items() if label == "POST /v1/events")
    assert events_calls >= MAX_EXAMPLES and sum(seen.values()) > 100
    assert failures == []
