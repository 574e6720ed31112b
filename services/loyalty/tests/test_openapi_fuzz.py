"""Schemathesis over the loyalty service's OpenAPI against a running process: no input gives a 500."""

from crm_common.testing.fuzz import fuzz_service


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    report = await fuzz_service("loyalty", database_url=await make_database("loyalty"), env=service_env)
    report.assert_sound(min_calls=100)
