"""Through the broker: contacts from crm.events.v1, requests from crm.messages.v1, events out."""

from __future__ import annotations

from datetime import timedelta

from crm_common.testing.helpers import eventually, publish, read_topic

from .conftest import add_template


def customer_updated(event_id: str, customer_id: str, at, **props):
    return {
        "id": f"ops:{event_id}",
        "source": "ops",
        "event_id": event_id,
        "type": "customer_updated",
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "received_at": at.isoformat(),
        "properties": props,
    }


def request(message_id: str, customer_id: str, at, **kw):
    return {
        "id": message_id,
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "template": "promo",
        "kind": "marketing",
        "source_service": "offers",
        **kw,
    }


async def test_requests_from_kafka_deliver_once_respect_consent_and_publish_delivery_events(
    start_app, provider, broker, topic_prefix, clock
):
    now = clock.now()
    events_topic, messages_topic = topic_prefix + "crm.events.v1", topic_prefix + "crm.messages.v1"
    async with start_app(consumers_enabled=True) as (client, _app):
        await add_template(
            client,
            "promo",
            "sms",
            body="Hi {{ customer.first_name }}: {{ offer }}",
            variables=["offer"],
        )
        await add_template(client, "promo", "email", subject="Offer", body="{{ offer }}", variables=["offer"])
        await publish(
            broker.bootstrap,
            events_topic,
            [
                customer_updated("e1", "ann", now, phone="+14155550101", first_name="Ann", consents={"sms": True}),
                customer_updated("e2", "bob", now, email="bob@example.org", consents={"email": False}),
                {
                    "id": "ops:e3",
                    "source": "pos",
                    "event_id": "e3",
                    "type": "purchase",
                    "customer_id": "ann",
                    "occurred_at": now.isoformat(),
                    "received_at": now.isoformat(),
                    "properties": {},
                },
            ],
        )
        # Contacts and requests travel on different topics; as in production, requests come later.
        await eventually(lambda: _granted(client, "bob", "email", False), timeout=30, what="contacts applied")
        m_ann = request("req-ann", "ann", now, variables={"offer": "20% off"})
        await publish(
            broker.bootstrap,
            messages_topic,
            [
                m_ann,
                m_ann,
                request("req-bob", "bob", now, variables={"offer": "x"}),
                {"id": "broken", "customer_id": "ann"},
            ],
        )
        await publish(broker.bootstrap, messages_topic, [m_ann])  # redelivered later

        async def settled():
            a, b = await _state(client, "req-ann"), await _state(client, "req-bob")
            return (a, b) if a.get("state") == "sent" and b.get("state") == "suppressed" else None

        _ann, bob = await eventually(settled, timeout=30, what="ann sent, bob suppressed")
        assert bob["reason"] == "no_consented_channel"
        assert [b["text"] for b in provider.bodies("/v1/sms") if b["reference"] == "req-ann"] == ["Hi Ann: 20% off"]
        contact = (await client.get("/v1/customers/ann/contact")).json()
        assert contact["phone"] == "+14155550101" and contact["consents"]["sms"]["granted"] is True

        # Consent withdrawn on the events topic takes effect before the next request is sent.
        later = now + timedelta(minutes=5)
        await publish(
            broker.bootstrap,
            events_topic,
            [customer_updated("e4", "ann", later, consents={"sms": False})],
        )
        await eventually(lambda: _granted(client, "ann", "sms", False), what="consent withdrawn")
        await publish(
            broker.bootstrap,
            messages_topic,
            [request("req-ann-2", "ann", later, variables={"offer": "y"})],
        )

        async def suppressed():
            return (await _state(client, "req-ann-2")).get("state") == "suppressed"

        await eventually(suppressed, timeout=20, what="second request suppressed")
        assert len([b for b in provider.bodies("/v1/sms") if b["reference"].startswith("req-ann")]) == 1

        deliveries = await read_topic(broker.bootstrap, topic_prefix + "crm.deliveries.v1", min_count=3)
        by_message = sorted((d["message_id"], d["status"]) for d in deliveries)
        assert by_message == [
            ("req-ann", "sent"),
            ("req-ann-2", "suppressed"),
            ("req-bob", "suppressed"),
        ]
        assert all(d["_key"] == d["customer_id"] for d in deliveries)
        dlq = await read_topic(broker.bootstrap, topic_prefix + "crm.dlq.v1", min_count=1)
        assert [d["message_id"] for d in dlq] == ["broken"]


async def _granted(client, customer_id, channel, value):
    r = await client.get(f"/v1/customers/{customer_id}/contact")
    return r.status_code == 200 and r.json()["consents"][channel]["granted"] is value


async def _state(client, message_id):
    r = await client.get(f"/v1/messages/{message_id}")
    return r.json() if r.status_code == 200 else {}
