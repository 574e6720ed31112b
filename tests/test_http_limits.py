"""Limits every service's HTTP layer keeps: request body size, path ids, no redirects built from the Host header."""

from __future__ import annotations

import pytest

from crm_common.db import create_engine, create_sessionmaker, session_scope
from crm_common.testing.helpers import run_app
from ingest.app import create_app as ingest_app
from ingest.keys import add_known_key
from ingest.settings import Settings as IngestSettings
from loyalty.app import create_app as loyalty_app
from loyalty.settings import Settings as LoyaltySettings
from notifier.app import create_app as notifier_app
from notifier.settings import Settings as NotifierSettings
from segmentation.app import create_app as segmentation_app
from segmentation.settings import Settings as SegmentationSettings

APPS = [
    (loyalty_app, LoyaltySettings, "/v1/redemptions"),
    (notifier_app, NotifierSettings, "/v1/templates"),
    (segmentation_app, SegmentationSettings, "/v1/segments"),
]


@pytest.mark.parametrize(("factory", "settings_cls", "path"), APPS)
async def test_a_body_over_the_limit_is_413_in_the_json_error_shape(factory, settings_cls, path, app_settings):
    big = b'{"x": "' + b"a" * (100 * 1024) + b'"}'
    async with run_app(factory(await app_settings(settings_cls, max_request_bytes=64 * 1024))) as client:
        declared = await client.post(path, content=big, headers={"Content-Type": "application/json"})

        async def chunks():
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        streamed = await client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(("factory", "settings_cls", "path"), APPS)
async def test_a_trailing_slash_is_a_json_404_without_a_redirect(factory, settings_cls, path, app_settings):
    async with run_app(factory(await app_settings(settings_cls, max_request_bytes=64 * 1024))) as client:
        r = await client.get(path + "/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"


# A route of each service that names a stored thing by an id in its path.
ID_ROUTES = [
    (ingest_app, IngestSettings, "/v1/events/pos/{}", "event_id"),
    (loyalty_app, LoyaltySettings, "/v1/accounts/{}/ledger", "customer_id"),
    (notifier_app, NotifierSettings, "/v1/messages/{}", "message_id"),
    (segmentation_app, SegmentationSettings, "/v1/segments/{}/members", "segment"),
]


async def _ingest_reader(settings: IngestSettings) -> dict[str, str]:
    """Ingest checks the keys of its own database: give the test one that may read events."""
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with session_scope(create_sessionmaker(engine)) as session:
            await add_known_key(session=session, key="reader", name="reader", source="pos", scopes=["events:read"])
    finally:
        await engine.dispose()
    return {"Authorization": "Bearer reader"}


@pytest.mark.parametrize(("factory", "settings_cls", "path", "param"), ID_ROUTES)
async def test_a_nul_or_blank_path_id_is_a_422_naming_the_parameter(factory, settings_cls, path, param, app_settings):
    settings = await app_settings(settings_cls)
    headers = await _ingest_reader(settings) if settings_cls is IngestSettings else None
    async with run_app(factory(settings), headers=headers) as client:
        refused = {raw: await client.get(path.format(raw)) for raw in ("%00", "a%00b", "%20", "%20%20%09")}
        known = await client.get(path.format("no-such-id"))
    for raw, r in refused.items():
        assert r.status_code == 422, (raw, r.status_code, r.text)
        body = r.json()
        # FastAPI's validation shape, also under "error" like every other error.
        assert body["detail"][0]["loc"] == ["path", param], (raw, body)
        assert body["error"]["code"] == "validation_error" and body["error"]["details"] == body["detail"]
    # A well-formed id is looked up: not found, not refused.
    assert known.status_code == 404, known.text


async def test_a_nul_or_blank_id_in_a_query_is_a_422_naming_the_parameter(app_settings):
    settings = await app_settings(SegmentationSettings)
    async with run_app(segmentation_app(settings)) as client:
        created = await client.post(
            "/v1/segments", json={"key": "buyers", "name": "b", "rule": {"attr": "orders", "op": ">", "value": 0}}
        )
        assert created.status_code == 201, created.text
        refused = [await client.get("/v1/segments/buyers/members", params={"cursor": c}) for c in ("c\x00", " ")]
        paged = await client.get("/v1/segments/buyers/members", params={"cursor": "c1"})
    for r in refused:
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"], r.text
    assert paged.status_code == 200 and paged.json()["items"] == []
