"""Every /v1 route of segmentation, loyalty, offers and notifier refuses a request without the ops
API key, except the notifier's routes that authenticate otherwise (signed callbacks and links); and
every one that is not a GET refuses a key without the `write` scope."""

from __future__ import annotations

import re

import httpx
import pytest

from crm_common.testing.helpers import TEST_API_KEY
from loyalty.app import create_app as loyalty_app
from notifier.app import create_app as notifier_app
from offers.app import create_app as offers_app
from segmentation.app import create_app as segmentation_app

# Authenticated by an HMAC signature or a signed token instead of the key.
PUBLIC = {
    "notifier": {
        "POST /v1/providers/{provider}/callbacks",
        "GET /v1/t/o/{token}",
        "GET /v1/t/c/{token}",
        "GET /v1/unsubscribe/{token}",
        "POST /v1/unsubscribe/{token}",
    },
}
FACTORIES = {"segmentation": segmentation_app, "loyalty": loyalty_app, "offers": offers_app, "notifier": notifier_app}


def operations(app) -> list[tuple[str, str]]:
    """(method, path) of every /v1 operation, as the OpenAPI lists them."""
    return sorted(
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        if path.startswith("/v1/")
        for method in item
    )


@pytest.mark.parametrize("service", sorted(FACTORIES))
async def test_every_v1_route_without_a_key_is_401_but_the_signed_public_ones(service):
    app = FACTORIES[service]()
    ops = operations(app)
    assert ("GET", "/v1/ops/pipeline") in ops
    # No lifespan: the key is checked before anything touches the runtime or the database.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for method, path in ops:
            label = f"{method} {path}"
            url = re.sub(r"\{[^}]+\}", "x", path)
            if label in PUBLIC.get(service, set()):
                continue
            r = await client.request(method, url, json={})
            assert r.status_code == 401, (label, r.status_code, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            r = await client.request(method, url, json={}, headers={"Authorization": "Bearer not-a-key"})
            assert r.status_code == 401, (label, r.status_code, r.text)
    assert PUBLIC.get(service, set()) <= {f"{m} {p}" for m, p in ops}


READ_ONLY_POSTS = {
    "segmentation": {("POST", "/v1/segments/dry-run")},
    "offers": {
        ("POST", "/v1/campaigns/dry-run"),
        ("POST", "/v1/campaigns/{campaign_id}/dry-run"),
        ("POST", "/v1/campaigns/{campaign_id}/backtest"),
        ("POST", "/v1/coupons/validate"),
    },
    "notifier": {("POST", "/v1/templates/{template_id}/preview")},
}


@pytest.mark.parametrize("service", sorted(FACTORIES))
async def test_a_read_only_key_changes_nothing_on_any_route(service, monkeypatch):
    monkeypatch.setenv("CRM_API_KEYS", f"{TEST_API_KEY},ops-reader:read+pii")
    app = FACTORIES[service]()
    doc = app.openapi()
    posts = [
        (m, p) for m, p in operations(app) if m not in ("GET", "HEAD") and f"{m} {p}" not in PUBLIC.get(service, set())
    ]
    reads = {(m, p) for m, p in posts if doc["paths"][p][m.lower()].get("x-changes-nothing")}
    # The POSTs that only read (dry-runs, previews, a coupon check): pinned, so a writing route is not
    # marked by accident.
    assert reads == READ_ONLY_POSTS.get(service, set())
    changes = [op for op in posts if op not in reads]
    assert ("POST", "/v1/ops/sweeps/{name}") in changes
    reader = {"Authorization": "Bearer ops-reader"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for method, path in changes:
            url = re.sub(r"\{[^}]+\}", "x", path)
            r = await client.request(method, url, json={}, headers=reader)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "missing_scope", (method, path, error)
            assert error["details"] == {"required_scope": "write", "scopes": ["pii", "read"]}
    # Past the key check (the app runs without its lifespan here, so what comes after may fail: a 500 or a
    # 422 is fine, a 403 is not).
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for method, path in sorted(reads):
            url = re.sub(r"\{[^}]+\}", "x", path)
            r = await client.request(method, url, json={}, headers=reader)
            assert r.status_code != 403, (method, path, r.status_code, r.text)
    # The routes that change something are not left out of the check.
    assert len(changes) >= {"segmentation": 3, "loyalty": 5, "offers": 9, "notifier": 4}[service]


def test_the_public_routes_are_not_behind_the_key_in_the_openapi():
    doc = notifier_app().openapi()
    for label in PUBLIC["notifier"]:
        method, path = label.split(" ")
        assert "security" not in doc["paths"][path][method.lower()], label
    assert doc["paths"]["/v1/templates"]["get"]["security"] == [{"ApiKey": []}]
