"""Schemathesis over the notifier's OpenAPI against a running process: no input gives a 500."""

from __future__ import annotations

import asyncio

from crm_common.infra import free_port
from crm_common.testing.fuzz import fuzz_openapi
from crm_common.testing.helpers import ServiceProcess

MAX_EXAMPLES = 15


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    url = await make_database("notifier")
    env = {**service_env, "NOTIFIER_DATABASE_URL": url, "NOTIFIER_SMTP_PORT": str(free_port())}
    proc = ServiceProcess("notifier", free_port(), env)
    await asyncio.to_thread(proc.start)
    try:
        seen, failures = await asyncio.to_thread(fuzz_openapi, proc.url, max_examples=MAX_EXAMPLES)
    finally:
        await asyncio.to_thread(proc.stop)
    assert sum(n for (label, _), n in seen.items() if label == "POST /v1/templates") >= MAX_EXAMPLES
    assert sum(seen.values()) > 150
    assert failures == []
    # The fuzzer sends the test key (negative cases may drop it): every operation gets past it, but the
    # provider callbacks, which are signed instead and refuse a generated body with 401 or 403.
    past_auth = {label for (label, status) in seen if status != 401}
    assert {label for (label, _) in seen} - past_auth <= {"POST /v1/providers/{provider}/callbacks"}
