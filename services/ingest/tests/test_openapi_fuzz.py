"""Schemathesis over ingest's OpenAPI, against a running ingest process: no input gives a 500."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import schemathesis
from crm_common.infra import free_port
from crm_common.testing.helpers import ServiceProcess
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import POS_KEY

MAX_EXAMPLES = 30


def fuzz(base_url: str, headers: dict[str, str]) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Call every operation with generated valid and invalid inputs; return statuses and 5xx found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()

    def caller(label: str) -> Callable[[Any], None]:
        def call(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            seen[(label, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{label} -> {response.status_code}: {response.text[:200]}")

        return call

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(caller(operation.label)))
            try:
                run()
            except Unsatisfiable:
                # Nothing invalid can be generated for an operation without inputs.
                assert mode is GenerationMode.NEGATIVE, operation.label
    return seen, failures


async def test_fuzzing_the_openapi_finds_no_server_error(ingest_db, service_env):
    url, _ = ingest_db
    proc = ServiceProcess("ingest", free_port(), {**service_env, "INGEST_DATABASE_URL": url})
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(fuzz, proc.url, {"Authorization": f"Bearer {POS_KEY}"})
    finally:
        await asyncio.to_thread(proc.stop)
    events_calls = sum(n for (label, _), n in seen.items() if label == "POST /v1/events")
    assert events_calls >= MAX_EXAMPLES and sum(seen.values()) > 100
    assert failures == []
