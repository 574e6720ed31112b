"""The dispatcher against real providers on loopback: SMTP (aiosmtpd) and an HTTP SMS/push API."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from crm_common.testing.helpers import eventually

from .conftest import add_template, message_state, seed_contact, wake


async def _settled(client, ids, states=("sent",)):
    async def check():
        rows = [await message_state(client, i) for i in ids]
        return rows if all(r["state"] in states for r in rows) else None

    return await eventually(check, timeout=15, what=f"messages {ids} in {states}")


async def test_sms_answered_500_twice_then_200_is_delivered_once_with_its_cost(start_app, provider):
    async with start_app(sms_cost_per_message="0.07") as (client, app):
        await seed_contact(app, "c1", phone="+14155550101", consents={"sms": True})
        await add_template(client, "hello", "sms", body="Hi {{ name }}", variables=["name"])
        provider.script([500, 500])
        r = await client.post(
            "/v1/messages",
            json={
                "id": "m-500",
                "customer_id": "c1",
                "template": "hello",
                "kind": "marketing",
                "variables": {"name": "Ann"},
            },
        )
        assert r.status_code == 202, r.text
        [msg] = await _settled(client, ["m-500"])
        sms = [b for b in provider.bodies("/v1/sms") if b.get("reference") == "m-500"]
        assert len(sms) == 1 and sms[0]["text"] == "Hi Ann" and sms[0]["to"] == "+14155550101"
        assert Decimal(msg["cost"]) == Decimal("0.07")
        assert msg["delivery_attempts"][0]["tries"] == 3 and msg["delivery_attempts"][0]["outcome"] == "ok"
        assert [e["status"] for e in msg["events"]] == ["sent"]
        metrics = (await client.get("/metrics")).text
        assert 'crm_notifier_provider_calls_total{outcome="ok",provider="sms"}' in metrics
        assert 'crm_notifier_sms_cost_total{provider="sms"}' in metrics


async def test_sms_and_push_requests_follow_the_provider_contracts(start_app, provider):
    async with start_app(sms_api_key="sms-key", push_access_token="push-token", push_project_id="proj") as (
        client,
        app,
    ):
        await seed_contact(app, "c1", phone="+14155550101")
        await seed_contact(app, "c2", push_tokens=["old", "tok-2"])
        await add_template(client, "code", "sms", body="Your code {{ code }}", variables=["code"])
        await add_template(client, "code", "push", subject="Code", body="Your code {{ code }}", variables=["code"])
        for mid, customer in (("m-sms", "c1"), ("m-push", "c2")):
            body = {"id": mid, "customer_id": customer, "template": "code", "variables": {"code": "42"}}
            assert (await client.post("/v1/messages", json=body)).status_code == 202
        sms_msg, push_msg = await _settled(client, ["m-sms", "m-push"])
        [sms] = [r for r in provider.received if r.body.get("reference") == "m-sms"]
        assert sms.method == "POST" and sms.path == "/v1/sms"
        assert sms.headers["authorization"] == "Bearer sms-key" and sms.headers["idempotency-key"] == "m-sms"
        assert sms.headers["content-type"] == "application/json"
        assert sms.body == {
            "to": "+14155550101",
            "from": "CRM",
            "text": "Your code 42",
            "reference": "m-sms",
            "callback_url": "http://test/v1/providers/sms/callbacks",
        }
        assert sms_msg["provider_message_id"].startswith("p-")
        [push] = [
            r for r in provider.received if r.body.get("message", {}).get("data", {}).get("message_id") == "m-push"
        ]
        assert push.method == "POST" and push.path == "/v1/projects/proj/messages:send"
        assert push.headers["authorization"] == "Bearer push-token"
        assert push.body == {
            "message": {
                "token": "tok-2",
                "notification": {"title": "Code", "body": "Your code 42"},
                "data": {"message_id": "m-push", "customer_id": "c2"},
            }
        }
        assert push_msg["provider_message_id"].startswith("projects/fake/messages/")


async def test_a_provider_slower_than_its_timeout_is_retried_then_parked(start_app, provider):
    async with start_app(sms_timeout_s=0.1) as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        await add_template(client, "code", "sms", body="Your code")
        provider.delay_s = 0.5
        await client.post("/v1/messages", json={"id": "m-slow", "customer_id": "c1", "template": "code"})
        [msg] = await _settled(client, ["m-slow"], states=("retrying",))
        [attempt] = msg["delivery_attempts"]
        assert attempt["outcome"] == "transient" and attempt["tries"] == 3
        assert attempt["error"].startswith("TimeoutError") and msg["next_attempt_at"] and msg["sent_at"] is None


async def test_permanent_provider_error_fails_without_retry(start_app, provider):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101")
        await add_template(client, "code", "sms", body="Your code")
        provider.script([400, 200])
        await client.post("/v1/messages", json={"id": "m-400", "customer_id": "c1", "template": "code"})
        [msg] = await _settled(client, ["m-400"], states=("failed",))
        assert msg["reason"].startswith("provider_rejected") and msg["delivery_attempts"][0]["tries"] == 1
        assert not [b for b in provider.bodies("/v1/sms") if b.get("reference") == "m-400"]


async def test_provider_down_for_a_while_gets_every_parked_message_later(start_app, provider, clock):
    async with start_app() as (client, app):
        await add_template(client, "receipt", "sms", body="Receipt {{ n }}", variables=["n"])
        ids = [f"park-{i}" for i in range(8)]
        for i in range(len(ids)):
            await seed_contact(app, f"c{i}", phone=f"+1415555{i:04d}")
        provider.down()
        for i, mid in enumerate(ids):
            r = await client.post(
                "/v1/messages",
                json={
                    "id": mid,
                    "customer_id": f"c{i}",
                    "template": "receipt",
                    "variables": {"n": i},
                },
            )
            assert r.status_code == 202
        parked = await _settled(client, ids, states=("retrying", "queued"))
        assert all(m["next_attempt_at"] and m["sent_at"] is None for m in parked)
        status = (await client.get("/v1/providers")).json()
        sms = next(p for p in status if p["name"] == "sms")
        assert sms["state"] in ("down", "probing") and sum(sms["waiting"].values()) == len(ids)
        provider.up()

        async def breaker_lets_probes_through():
            status = (await client.get("/v1/providers")).json()
            return next(p for p in status if p["name"] == "sms")["state"] != "down"

        await eventually(breaker_lets_probes_through, what="breaker cooldown")
        clock.advance(hours=1)
        wake(app)
        await _settled(client, ids)
        refs = sorted(b["reference"] for b in provider.bodies("/v1/sms") if b.get("reference", "").startswith("park-"))
        assert refs == sorted(ids)


async def test_email_goes_over_smtp_with_one_click_unsubscribe_headers_and_tracking(start_app, smtp, provider):
    box, _ = smtp
    async with start_app() as (client, app):
        await seed_contact(app, "e1", email="ann@example.org", consents={"email": True}, first_name="Ann")
        await add_template(
            client,
            "promo",
            "email",
            subject="Hello {{ customer.first_name }}",
            body="Wine: {{ wine }}",
            html='<html><body><a href="https://shop.example/wine?x=1">{{ wine }}</a></body></html>',
            variables=["wine"],
        )
        await client.post(
            "/v1/messages",
            json={
                "id": "em-1",
                "customer_id": "e1",
                "template": "promo",
                "kind": "marketing",
                "variables": {"wine": "Rioja"},
            },
        )
        await _settled(client, ["em-1"])
        [mail] = box.to("ann@example.org")
        assert mail["Subject"] == "Hello Ann"
        assert mail["List-Unsubscribe"].startswith("<http://test/v1/unsubscribe/")
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        html = next(p for p in mail.walk() if p.get_content_type() == "text/html").get_content()
        assert "shop.example" not in html.split("/v1/t/c/")[0] and "/v1/t/o/" in html

        pixel = html.split('src="http://test')[1].split('"')[0]
        assert (await client.get(pixel)).status_code == 200
        assert (await client.get(pixel)).status_code == 200  # a second open is the same event
        link = html.split('href="http://test')[1].split('"')[0]
        r = await client.get(link)
        assert r.status_code == 302 and r.headers["location"] == "https://shop.example/wine?x=1"
        events = [e["status"] for e in (await message_state(client, "em-1"))["events"]]
        assert sorted(events) == ["clicked", "opened", "sent"]

        unsubscribe = mail["List-Unsubscribe"].strip("<>").removeprefix("http://test")
        assert "Unsubscribe" in (await client.get(unsubscribe)).text
        contact = (await client.get("/v1/customers/e1/contact")).json()
        assert contact["consents"]["email"]["granted"] is True  # GET shows, never performs
        assert (await client.post(unsubscribe, data={"List-Unsubscribe": "One-Click"})).status_code == 200
        contact = (await client.get("/v1/customers/e1/contact")).json()
        assert contact["consents"]["email"]["granted"] is False

        await client.post(
            "/v1/messages",
            json={
                "id": "em-2",
                "customer_id": "e1",
                "template": "promo",
                "kind": "marketing",
                "channel": "email",
                "variables": {"wine": "Rioja"},
            },
        )
        [after] = await _settled(client, ["em-2"], states=("suppressed",))
        assert after["reason"] == "no_consent:email" and len(box.to("ann@example.org")) == 1


async def test_tampered_tracking_and_unsubscribe_tokens_are_refused(start_app, provider):
    async with start_app() as (client, app):
        links = app.state.notifier.links
        good = links.unsubscribe_url("m1", "c1", "email").removeprefix("http://test")
        body, mac = good.rsplit("/", 1)[1].split(".")
        forged = app.state.notifier.signer.sign("unsubscribe", {"m": "m1", "c": "victim", "ch": "email"}).split(".")[0]
        for bad in (
            f"{forged}.{mac}",
            f"{body}.{mac[:-2]}AA",
            f"{body}x.{mac}",
            "nonsense",
            "a.b.c",
        ):
            for method in ("GET", "POST"):
                r = await client.request(method, f"/v1/unsubscribe/{bad}")
                assert r.status_code == 403, (bad, r.text)
        click = links.click_url("m1", "https://shop.example/").removeprefix("http://test")
        body, mac = click.rsplit("/", 1)[1].split(".")
        evil = app.state.notifier.signer.sign("click", {"m": "m1", "u": "https://evil.example/"}).split(".")[0]
        assert (await client.get(f"/v1/t/c/{evil}.{mac}")).status_code == 403
        opened = links.open_url("m1").rsplit("/", 1)[1]
        assert (await client.get(f"/v1/t/c/{opened}")).status_code == 403  # an open token is not a click token
        assert (await client.get(f"/v1/t/o/{opened[:-3]}xyz")).status_code == 403


async def test_push_uses_the_fcm_v1_shape(start_app, provider):
    async with start_app() as (client, app):
        await seed_contact(
            app,
            "p1",
            push_tokens=["tok-old", "tok-new"],
            consents={"push": True, "email": True},
            email="p1@example.org",
        )
        await add_template(client, "promo", "push", subject="Sale", body="{{ pct }}% off", variables=["pct"])
        await add_template(client, "promo", "email", subject="Sale", body="{{ pct }}% off", variables=["pct"])
        await client.post(
            "/v1/messages",
            json={
                "id": "push-1",
                "customer_id": "p1",
                "template": "promo",
                "kind": "marketing",
                "variables": {"pct": 20},
            },
        )
        [msg] = await _settled(client, ["push-1"])
        assert msg["channel"] == "push" and msg["provider_message_id"].startswith("projects/")
        [body] = [b for b in provider.bodies(":send") if b["message"]["data"]["message_id"] == "push-1"]
        assert body["message"]["token"] == "tok-new" and body["message"]["notification"] == {
            "title": "Sale",
            "body": "20% off",
        }


async def test_expired_waiting_message_is_swept_to_expired(start_app, provider, clock):
    async with start_app() as (client, app):
        await seed_contact(app, "x1", phone="+14155550101", consents={"sms": True})
        await add_template(client, "late", "sms", body="late")
        later = clock.now() + timedelta(hours=2)
        await client.post(
            "/v1/messages",
            json={
                "id": "exp-1",
                "customer_id": "x1",
                "template": "late",
                "not_before": later.isoformat(),
                "expires_at": (clock.now() + timedelta(hours=1)).isoformat(),
            },
        )
        assert (await message_state(client, "exp-1"))["state"] == "deferred"
        clock.advance(hours=1, minutes=1)
        r = await client.post("/v1/ops/sweeps/expire_messages")
        assert r.json()["result"] == 1
        msg = await message_state(client, "exp-1")
        assert msg["state"] == "expired" and [e["status"] for e in msg["events"]] == ["expired"]


async def test_messages_leased_by_a_dispatcher_that_died_are_sent_after_the_lease(start_app, provider, clock):
    async with start_app(dispatcher_enabled=False, dispatch_lease_s=60) as (client, app):
        await seed_contact(app, "d1", phone="+14155550101")
        await add_template(client, "t", "sms", body="x")
        await client.post("/v1/messages", json={"id": "lease-1", "customer_id": "d1", "template": "t"})
        runtime = app.state.runtime
        async with runtime.sessionmaker() as session:  # a dispatcher claims, then dies before sending
            from notifier.repository import NotifierRepository

            claimed = await NotifierRepository(session).claim_due(
                now=clock.now(), lease_until=clock.now() + timedelta(seconds=60), limit=10
            )
            await session.commit()
        assert [m.id for m in claimed] == ["lease-1"]
        assert await app.state.notifier.dispatcher.run_once() == 0  # leased: nobody else takes it
        assert (await client.post("/v1/ops/sweeps/release_stale_leases")).json()["result"] == 0
        clock.advance(seconds=61)
        assert (await client.post("/v1/ops/sweeps/release_stale_leases")).json()["result"] == 1
        assert await app.state.notifier.dispatcher.run_once() == 1
        assert (await message_state(client, "lease-1"))["state"] == "sent"
        assert len([b for b in provider.bodies("/v1/sms") if b["reference"] == "lease-1"]) == 1


async def test_push_token_reported_unregistered_is_dropped_and_the_next_message_uses_email(start_app, provider):
    async with start_app() as (client, app):
        await seed_contact(
            app, "p2", push_tokens=["dead"], email="p2@example.org", consents={"push": True, "email": True}
        )
        await add_template(client, "promo", "push", subject="Sale", body="Sale")
        await add_template(client, "promo", "email", subject="Sale", body="Sale")
        provider.script([404])
        await client.post(
            "/v1/messages", json={"id": "pt-1", "customer_id": "p2", "template": "promo", "kind": "marketing"}
        )
        [msg] = await _settled(client, ["pt-1"], states=("failed",))
        assert msg["channel"] == "push" and msg["reason"].startswith("provider_rejected")
        assert (await client.get("/v1/customers/p2/contact")).json()["push_tokens"] == 0
        await client.post(
            "/v1/messages", json={"id": "pt-2", "customer_id": "p2", "template": "promo", "kind": "marketing"}
        )
        [after] = await _settled(client, ["pt-2"])
        assert after["channel"] == "email"


async def test_a_campaigns_messages_are_counted_by_channel_state_and_suppression_reason(start_app, provider):
    async with start_app() as (client, app):
        await seed_contact(app, "c1", phone="+14155550101", consents={"sms": True})
        await seed_contact(app, "c2", phone="+14155550102", consents={"sms": False})
        await seed_contact(app, "c3", phone="+14155550103", consents={"sms": True})
        await add_template(client, "sale", "sms", body="Sale")
        sends = [("m1", "c1", "cmp-a"), ("m2", "c2", "cmp-a"), ("m3", "c3", "cmp-b")]
        for mid, customer, campaign in sends:
            body = {
                "id": mid,
                "customer_id": customer,
                "template": "sale",
                "kind": "marketing",
                "campaign_id": campaign,
            }
            assert (await client.post("/v1/messages", json=body)).status_code == 202
        await _settled(client, ["m1", "m3"])
        r = await client.get("/v1/campaigns/cmp-a/messages")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["total"] == 2
        assert sorted((c["channel"], c["state"], c["reason"], c["messages"]) for c in doc["counts"]) == [
            ("-", "suppressed", "no_consented_channel", 1),
            ("sms", "sent", None, 1),
        ]
        assert (await client.get("/v1/campaigns/none-such/messages")).json() == {
            "campaign_id": "none-such",
            "total": 0,
            "counts": [],
        }
        assert (await client.get("/v1/campaigns/%00/messages")).status_code == 422


async def test_the_channel_report_sums_what_the_sent_messages_cost_by_month_and_channel(start_app, provider):
    async with start_app(sms_cost_per_message="0.05") as (client, app):
        assert (await client.get("/v1/reports/channels")).json() == {"rows": [], "by_channel": {}, "total": "0"}
        await seed_contact(app, "c1", phone="+14155550101", consents={"sms": True})
        await seed_contact(app, "c2", phone="+14155550102", consents={"sms": True})
        await seed_contact(app, "c3", consents={"sms": False})  # no channel: never sent, costs nothing
        await add_template(client, "note", "sms", body="Hi")
        for i, cid in enumerate(("c1", "c2", "c1", "c3")):
            r = await client.post("/v1/messages", json={"id": f"cost-{i}", "customer_id": cid, "template": "note"})
            assert r.status_code == 202, r.text
        sent = await _settled(client, ["cost-0", "cost-1", "cost-2"], states=("sent", "delivered"))
        month = sent[0]["sent_at"][:7]
        doc = (await client.get("/v1/reports/channels")).json()
        assert doc["rows"] == [
            {"month": month, "channel": "sms", "sent": 3, "delivered": 0, "failed": 0, "cost": "0.1500"}
        ]
        assert doc["by_channel"] == {"sms": "0.1500"} and doc["total"] == "0.1500"
