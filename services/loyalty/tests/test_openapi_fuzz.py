"""Schemathesis over the loyalty service's OpenAPI against a running process: no input gives a 500."""

from __future__ import annotations

import asyncio

from crm_common.infra import free_port
from crm_common.testing.fuzz import fuzz_openapi
from crm_common.testing.helpers import ServiceProcess

MAX_EXAMPLES = 15


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    url = await make_database("loyalty")
    proc = ServiceProcess("loyalty", free_port(), {**service_env, "LOYALTY_DATABASE_URL": url})
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(fuzz_openapi, proc.url, max_examples=MAX_EXAMPLES)
    finally:
        await asyncio.to_thread(proc.stop)
    assert sum(seen.values()) > 100
    assert failures == []
    # The fuzzer sends the test key (negative cases may drop it): every operation gets past it.
    assert {label for (label, _) in seen} == {label for (label, status) in seen if status != 401}
