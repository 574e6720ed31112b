"""The notifier's API needs the ops key; provider callbacks and the signed links in messages do not."""

from __future__ import annotations

import httpx
import orjson

from notifier.tokens import callback_signature

from .conftest import add_template, message_state, seed_contact, wait_for_state


async def test_callbacks_and_signed_links_work_without_a_key_and_the_ops_routes_do_not(start_app, provider):
    async with start_app(sms_callback_secret="s3cret") as (client, app):
        await seed_contact(app, "k1", phone="+14155550101", consents={"sms": True})
        await add_template(client, "code", "sms", body="code")
        await client.post("/v1/messages", json={"id": "key-1", "customer_id": "k1", "template": "code"})

        msg = await wait_for_state(client, "key-1", "sent", what="sent")
        links = app.state.notifier.links
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as anonymous:
            for method, path in (
                ("GET", "/v1/ops/pipeline"),
                ("POST", "/v1/ops/sweeps/expire_messages"),
                ("GET", "/v1/templates"),
                ("GET", "/v1/messages/key-1"),
                ("POST", "/v1/messages"),
                ("GET", "/v1/providers"),
            ):
                r = await anonymous.request(method, path)
                assert r.status_code == 401, (method, path, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"

            body = orjson.dumps({"provider_message_id": msg["provider_message_id"], "status": "delivered"})
            r = await anonymous.post(
                "/v1/providers/sms/callbacks", content=body, headers={"X-Signature": callback_signature("s3cret", body)}
            )
            assert r.status_code == 200 and r.json()["state"] == "delivered", r.text
            pixel = await anonymous.get(links.open_url("key-1").removeprefix("http://test"))
            assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"
            click = await anonymous.get(links.click_url("key-1", "https://shop.example/").removeprefix("http://test"))
            assert click.status_code == 302 and click.headers["location"] == "https://shop.example/"
            unsubscribe = links.unsubscribe_url("key-1", "k1", "sms").removeprefix("http://test")
            assert (await anonymous.get(unsubscribe)).status_code == 200
            assert (await anonymous.post(unsubscribe)).status_code == 200

        events = {e["status"] for e in (await message_state(client, "key-1"))["events"]}
        assert {"delivered", "opened", "clicked", "unsubscribed"} <= events
        contact = (await client.get("/v1/customers/k1/contact")).json()
        assert contact["consents"]["sms"]["granted"] is False


async def test_a_key_without_pii_sees_the_contact_masked_and_one_with_pii_sees_it_whole(start_app):
    from crm_common.testing.helpers import TEST_API_KEY

    async with start_app(api_keys=f"{TEST_API_KEY},reader:read,pii-reader:read+pii") as (client, app):
        await seed_contact(app, "k2", email="jane.roe@example.com", phone="+447700900123", consents={"sms": True})
        path = "/v1/customers/k2/contact"
        whole = (await client.get(path, headers={"Authorization": "Bearer pii-reader"})).json()
        assert (whole["email"], whole["phone"]) == ("jane.roe@example.com", "+447700900123")
        masked = (await client.get(path, headers={"Authorization": "Bearer reader"})).json()
        assert (masked["email"], masked["phone"]) == ("j***@example.com", "+44********23")
        assert {k: v for k, v in masked.items() if k not in ("email", "phone")} == {
            k: v for k, v in whole.items() if k not in ("email", "phone")
        }
        r = await client.post(
            "/v1/messages", json={"customer_id": "k2", "template": "x"}, headers={"Authorization": "Bearer reader"}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
