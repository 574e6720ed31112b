"""Schemathesis over ingest's OpenAPI, against a running ingest process: no input gives a 500."""

from crm_common.testing.fuzz import fuzz_service

from .conftest import POS_KEY


async def test_fuzzing_the_openapi_finds_no_server_error(ingest_db, service_env):
    url, _ = ingest_db
    auth = {"Authorization": f"Bearer {POS_KEY}"}
    report = await fuzz_service(
        "ingest", database_url=url, env=service_env, max_examples=30, headers=auth, skip_prefixes=()
    )
    assert report.calls("POST /v1/events") >= 30
    report.assert_sound(min_calls=100)
