"""With the database unreachable, the APIs answer a retryable 503 in the JSON error shape, never a 500."""

from __future__ import annotations

import pytest

from crm_common.infra import free_port
from crm_common.testing.helpers import run_app, stack_settings
from loyalty.app import create_app as loyalty_app
from loyalty.settings import Settings as LoyaltySettings
from notifier.app import create_app as notifier_app
from notifier.settings import Settings as NotifierSettings

CASES = [
    (
        loyalty_app,
        LoyaltySettings,
        "POST",
        "/v1/redemptions",
        {"redemption_id": "r1", "customer_id": "c1", "check_amount": "10.00"},
    ),
    (loyalty_app, LoyaltySettings, "GET", "/v1/accounts/c1", None),
    (notifier_app, NotifierSettings, "GET", "/v1/templates", None),
    (notifier_app, NotifierSettings, "GET", "/v1/customers/c1/messages", None),
]


@pytest.mark.parametrize(("factory", "settings_cls", "method", "path", "body"), CASES)
async def test_requests_get_503_while_the_database_is_unreachable(factory, settings_cls, method, path, body, broker):
    dead = f"postgresql+asyncpg://crm:crm@127.0.0.1:{free_port()}/nothing"
    settings = stack_settings(settings_cls, database_url=dead, bootstrap=broker.bootstrap)
    async with run_app(factory(settings)) as client:
        r = await client.request(method, path, json=body)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "5"
        assert r.json()["error"]["code"] == "unavailable"
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")
