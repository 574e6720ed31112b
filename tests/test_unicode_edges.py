"""Text that is not valid Unicode (a lone surrogate, sent as a \\ud800 escape) is a 422, never a 500."""

from __future__ import annotations

from crm_common.testing.helpers import run_app
from loyalty.app import create_app as loyalty_app
from loyalty.settings import Settings as LoyaltySettings
from segmentation.app import create_app as segmentation_app
from segmentation.settings import Settings as SegmentationSettings


async def test_a_lone_surrogate_in_a_segment_rule_is_422_and_nothing_is_saved(app_settings):
    settings = await app_settings(SegmentationSettings)
    rule = '{"attr": "favourite_category", "op": "=", "value": "\\ud800"}'
    async with run_app(segmentation_app(settings)) as client:
        headers = {"Content-Type": "application/json"}
        before = (await client.get("/v1/segments")).json()
        dry = await client.post("/v1/segments/dry-run", content='{"rule": ' + rule + "}", headers=headers)
        created = await client.post(
            "/v1/segments", content='{"key": "surrogate", "name": "s", "rule": ' + rule + "}", headers=headers
        )
        after = (await client.get("/v1/segments")).json()
    for r in (dry, created):
        assert r.status_code == 422, r.text
        assert "Unicode" in r.json()["error"]["message"]
    assert after == before


async def test_a_lone_surrogate_in_typed_loyalty_fields_is_422_naming_the_field(app_settings):
    settings = await app_settings(LoyaltySettings)
    headers = {"Content-Type": "application/json"}
    async with run_app(loyalty_app(settings)) as client:
        adjustment = await client.post(
            "/v1/accounts/c1/adjustments",
            content='{"adjustment_id": "a\\ud800", "points": "10", "reason": "r"}',
            headers=headers,
        )
        redemption = await client.post(
            "/v1/redemptions",
            content='{"redemption_id": "\\udfff", "customer_id": "c1", "check_amount": "10.00"}',
            headers=headers,
        )
        account = await client.get("/v1/accounts/c1")
    # Typed fields are refused by validation, with the field named.
    assert adjustment.status_code == 422 and adjustment.json()["error"]["details"][0]["loc"] == [
        "body",
        "adjustment_id",
    ]
    assert redemption.status_code == 422 and redemption.json()["error"]["details"][0]["loc"] == [
        "body",
        "redemption_id",
    ]
    assert account.status_code == 404
