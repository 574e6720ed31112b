"""Schemathesis over the offers service's OpenAPI against a running process: no input gives a 500."""

from __future__ import annotations

import asyncio

from crm_common.infra import free_port
from crm_common.testing.fuzz import fuzz_openapi
from crm_common.testing.helpers import ServiceProcess, serve_app
from notifier.app import create_app as notifier_app
from notifier.settings import Settings as NotifierSettings
from segmentation.app import create_app as segmentation_app
from segmentation.settings import Settings as SegmentationSettings

from .conftest import stack_settings

MAX_EXAMPLES = 15


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env, broker, topic_prefix):
    url = await make_database("offers")
    seg = segmentation_app(
        SegmentationSettings(
            **stack_settings(await make_database("segmentation"), broker, topic_prefix, consumers_enabled=False)
        )
    )
    note = notifier_app(
        NotifierSettings(
            **stack_settings(
                await make_database("notifier"), broker, topic_prefix, consumers_enabled=False, dispatcher_enabled=False
            )
        )
    )
    async with serve_app(seg) as seg_url, serve_app(note) as note_url:
        env = {
            **service_env,
            "OFFERS_DATABASE_URL": url,
            "OFFERS_SEGMENTATION_URL": seg_url,
            "OFFERS_NOTIFIER_URL": note_url,
        }
        proc = ServiceProcess("offers", free_port(), env)
        await asyncio.to_thread(proc.start)
        try:
            seen, failures = await asyncio.to_thread(fuzz_openapi, proc.url, max_examples=MAX_EXAMPLES)
        finally:
            await asyncio.to_thread(proc.stop)
    assert sum(seen.values()) > 100
    assert failures == []
    assert {label for (label, _) in seen} == {label for (label, status) in seen if status != 401}
