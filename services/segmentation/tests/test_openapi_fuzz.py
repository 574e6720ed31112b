"""Schemathesis over the segmentation service's OpenAPI against a running process: no input gives a 500."""

from crm_common.testing.fuzz import fuzz_service


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    url = await make_database("segmentation")
    report = await fuzz_service("segmentation", database_url=url, env=service_env)
    assert report.calls("POST /v1/segments/dry-run") >= 15
    report.assert_sound(min_calls=100)
