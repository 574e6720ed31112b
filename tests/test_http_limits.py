"""Limits every service's HTTP layer keeps: request body size, no redirects built from the Host header."""

from __future__ import annotations

import pytest

from crm_common.testing.helpers import run_app
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
