"""Schemathesis over the notifier's OpenAPI against a running process: no input gives a 500."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from crm_common.infra import free_port
from crm_common.testing.helpers import ServiceProcess

MAX_EXAMPLES = 15


def fuzz(base_url: str) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Call every operation with valid and invalid inputs; return the statuses and 5xx found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()

    def caller(label: str) -> Callable[[Any], None]:
        def call(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=30)
            seen[(label, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{label} -> {response.status_code}: {response.text[:200]}")

        return call

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label.startswith("POST /v1/ops/sweeps"):
            continue  # runs real sweeps; covered by their own tests
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
                assert mode is GenerationMode.NEGATIVE, operation.label
    return seen, failures


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    url = await make_database("notifier")
    env = {**service_env, "NOTIFIER_DATABASE_URL": url, "NOTIFIER_SMTP_PORT": str(free_port())}
    proc = ServiceProcess("notifier", free_port(), env)
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(fuzz, proc.url)
    finally:
        await asyncio.to_thread(proc.stop)
    assert sum(n for (label, _), n in seen.items() if label == "POST /v1/templates") >= MAX_EXAMPLES
    assert sum(seen.values()) > 150
    assert failures == []
