"""Schemathesis over the notifier's OpenAPI against a running process: no input gives a 500."""

from crm_common.infra import free_port
from crm_common.testing.fuzz import fuzz_service


async def test_fuzzing_the_openapi_finds_no_server_error(make_database, service_env):
    env = {**service_env, "NOTIFIER_SMTP_PORT": str(free_port())}
    report = await fuzz_service("notifier", database_url=await make_database("notifier"), env=env)
    assert report.calls("POST /v1/templates") >= 15
    # Provider callbacks are signed instead of behind the key: they refuse generated calls (401, 403).
    report.assert_sound(min_calls=150, signed={"POST /v1/providers/{provider}/callbacks"})
