"""Provider callbacks are HMAC-signed; a bad signature is refused, a good one marks delivery."""

from __future__ import annotations

import orjson

from notifier.tokens import callback_signature

from .conftest import add_template, message_state, seed_contact, wait_for_state


async def test_signed_callback_marks_delivered_and_a_bad_signature_is_refused(start_app, provider):
    async with start_app(sms_callback_secret="s3cret") as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        await add_template(client, "code", "sms", body="code")
        await client.post("/v1/messages", json={"id": "cb-1", "customer_id": "c1", "template": "code"})

        msg = await wait_for_state(client, "cb-1", "sent", what="sent")
        body = orjson.dumps({"provider_message_id": msg["provider_message_id"], "status": "delivered"})
        url = "/v1/providers/sms/callbacks"
        assert (await client.post(url, content=body)).status_code == 401
        assert (
            await client.post(url, content=body, headers={"X-Signature": callback_signature("wrong", body)})
        ).status_code == 403
        tampered = body.replace(b"delivered", b"failed\x20\x20\x20")
        assert (
            await client.post(url, content=tampered, headers={"X-Signature": callback_signature("s3cret", body)})
        ).status_code == 403
        assert (await message_state(client, "cb-1"))["state"] == "sent"
        r = await client.post(url, content=body, headers={"X-Signature": callback_signature("s3cret", body)})
        assert r.status_code == 200 and r.json() == {
            "message_id": "cb-1",
            "state": "delivered",
            "applied": True,
        }
        r = await client.post(url, content=body, headers={"X-Signature": callback_signature("s3cret", body)})
        assert r.json()["applied"] is False  # a repeated report changes nothing
        events = [e["status"] for e in (await message_state(client, "cb-1"))["events"]]
        assert sorted(events) == ["delivered", "sent"]
        bad = b'{"status": "delivered"}'
        assert (
            await client.post(url, content=bad, headers={"X-Signature": callback_signature("s3cret", bad)})
        ).status_code == 422


async def test_an_oversized_callback_is_413_and_is_not_buffered_whole(start_app):
    async with start_app() as (client, _):
        url = "/v1/providers/sms/callbacks"
        big = b'{"message_id": "x", "status": "delivered", "reason": "' + b"x" * 70_000 + b'"}'
        r = await client.post(url, content=big, headers={"X-Signature": "sha256=00"})
        assert r.status_code == 413 and r.json()["error"]["details"] == {"max_bytes": 64_000}
        sent = 0

        async def endless():
            nonlocal sent
            while sent < 50_000_000:
                sent += 1 << 16
                yield b"x" * (1 << 16)

        # No Content-Length (chunked): refused once the limit is passed, not after reading it all.
        r = await client.post(url, content=endless())
        assert r.status_code == 413
        assert sent < 1_000_000, sent
