"""Ids with NUL or only blanks are a 422 naming the parameter; unstorable message times a 422, never a 500."""

from __future__ import annotations

import pytest

from crm_common.consumer import PoisonMessage, Record
from notifier.consumers import parse_request

from .conftest import add_template, seed_contact


async def test_an_id_with_nul_is_a_422_naming_the_parameter_and_touches_nothing(start_app):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        created = await add_template(client, "code", "sms", body="code")
        tid = created["id"]
        await client.post("/v1/messages", json={"id": "m-1", "customer_id": "c1", "template": "code"})
        refused = [
            (await client.get(f"/v1/templates/{tid}%00"), ["path", "template_id"]),
            (await client.delete(f"/v1/templates/{tid}%00"), ["path", "template_id"]),
            (await client.put(f"/v1/templates/{tid}%00", json={"body": "replaced"}), ["path", "template_id"]),
            (await client.post(f"/v1/templates/%00{tid}/preview", json={}), ["path", "template_id"]),
            (await client.get("/v1/templates", params={"key": "code\x00"}), ["query", "key"]),
            (await client.get("/v1/customers/c1%00/contact"), ["path", "customer_id"]),
            (await client.get("/v1/customers/%20/contact"), ["path", "customer_id"]),
            (await client.get("/v1/messages/m-1%00"), ["path", "message_id"]),
            (await client.get("/v1/customers/c1%00/messages"), ["path", "customer_id"]),
        ]
        for r, loc in refused:
            assert r.status_code == 422, (loc, r.status_code, r.text)
            assert r.json()["error"]["details"][0]["loc"] == loc, r.text
        # The id without the NUL still names its template, contact and messages, unchanged.
        assert (await client.get(f"/v1/templates/{tid}")).json()["body"] == "code"
        assert (await client.get("/v1/templates", params={"key": "code"})).json()["total"] == 1
        assert (await client.get("/v1/customers/c1/contact")).status_code == 200
        assert (await client.get("/v1/messages/m-1")).status_code == 200
        assert (await client.get("/v1/customers/c1/messages")).json()["total"] == 1


async def test_message_times_without_a_utc_equivalent_are_refused_with_422(start_app):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        await add_template(client, "code", "sms", body="code")
        for field, value in (
            ("not_before", "0001-01-01T00:00:00+14:00"),
            ("expires_at", "0001-01-01T05:00:00+06:00"),
            ("expires_at", "9999-12-31T23:59:59-14:00"),
            ("not_before", "9999-12-31T20:00:00-05:00"),
        ):
            r = await client.post("/v1/messages", json={"customer_id": "c1", "template": "code", field: value})
            assert r.status_code == 422, (field, value, r.status_code, r.text[:200])
            assert r.json()["detail"][0]["loc"] == ["body", field]
        r = await client.post(
            "/v1/messages",
            json={"customer_id": "c1", "template": "code", "expires_at": "9999-12-31T23:59:59+00:00"},
        )
        assert r.status_code == 202, r.text
        assert (await client.get("/v1/customers/c1/messages")).json()["total"] == 1


def test_a_requested_message_with_an_unstorable_time_is_a_poison_message():
    value = {
        "id": "loyalty:1",
        "customer_id": "c1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "kind": "transactional",
        "template": "code",
        "source_service": "loyalty",
        "not_before": "0001-01-01T00:00:00+14:00",
    }
    rec = Record(topic="crm.messages.v1", partition=0, offset=0, key="c1", id="loyalty:1", value=value)
    with pytest.raises(PoisonMessage, match="not_before"):
        parse_request(rec)
    value["not_before"] = "2026-01-02T00:00:00+14:00"
    assert parse_request(rec).not_before is not None


async def test_a_direct_send_retried_is_the_same_message_and_the_same_id_with_another_body_is_409(start_app):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        await add_template(client, "code", "sms", body="code {{ n }}", variables=["n"])
        await add_template(client, "other", "sms", body="other")
        body = {
            "id": "ops-7",
            "customer_id": "c1",
            "template": "code",
            "variables": {"n": 1},
            "expires_at": "2030-01-01T01:00:00+01:00",
        }
        first = await client.post("/v1/messages", json=body)
        assert first.status_code == 202, first.text
        retry = await client.post("/v1/messages", json={**body, "expires_at": "2030-01-01T00:00:00Z"})
        assert retry.status_code == 202 and retry.json()["id"] == "ops-7"
        for change in ({"template": "other"}, {"variables": {"n": 2}}, {"customer_id": "c2"}, {"kind": "marketing"}):
            r = await client.post("/v1/messages", json={**body, **change})
            assert r.status_code == 409, (change, r.text)
            err = r.json()["error"]
            assert err["code"] == "idempotency_conflict" and err["details"]["fields"] == [next(iter(change))]
        detail = (await client.get("/v1/messages/ops-7")).json()
        assert detail["template"] == "code" and detail["variables"] == {"n": 1}
        assert (await client.get("/v1/customers/c1/messages")).json()["total"] == 1


async def test_lone_surrogates_in_free_json_are_a_422_naming_the_field(start_app):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        created = await add_template(client, "code", "sms", body="code {{ x }}", variables=["x"])
        h = {"Content-Type": "application/json"}
        cases = [
            (
                "/v1/templates",
                '{"key": "s", "channel": "sms", "locale": "en", "body": "a", "sample": {"a": "\\ud800"}}',
                "sample",
            ),
            (
                "/v1/templates",
                '{"key": "s", "channel": "sms", "locale": "en", "body": "a", "sample": {"\\udfff": 1}}',
                "sample",
            ),
            ("/v1/messages", '{"customer_id": "c1", "template": "code", "variables": {"x": ["\\ud800"]}}', "variables"),
            (f"/v1/templates/{created['id']}/preview", '{"variables": {"x": "a\\udc00b"}}', "variables"),
        ]
        for url, raw, field in cases:
            r = await client.post(url, content=raw.encode(), headers=h)
            assert r.status_code == 422, (url, raw, r.status_code, r.text[:200])
            assert r.json()["detail"][0]["loc"] == ["body", field]
        r = await client.post(
            "/v1/messages",
            content=b'{"customer_id": "c1", "template": "code", "variables": {"x": "\\ud83d\\ude00"}}',
            headers=h,
        )
        assert r.status_code == 202, r.text
        assert (await client.get("/v1/customers/c1/messages")).json()["total"] == 1
