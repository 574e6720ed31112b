"""Every delivery event the notifier puts in its outbox is its topic's contract model, as written."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, get_args

import orjson
from sqlalchemy import text

from crm_common import serde
from crm_common.contract.messages import DeliveryStatus
from crm_common.outbox import TOPIC_MODELS
from crm_common.settings import TOPIC_DELIVERIES
from notifier.tokens import callback_signature

from .conftest import add_template, message_state, seed_contact, wait_for_state


async def _outbox(app: Any) -> list[tuple[str, str, dict[str, Any]]]:
    async with app.state.runtime.sessionmaker() as session:
        rows = await session.execute(text("SELECT topic, key, value FROM outbox ORDER BY id"))
        return [(r.topic, r.key, serde.loads(bytes(r.value))) for r in rows]


async def test_each_delivery_status_is_written_to_the_outbox_as_its_contract_model(start_app, provider, clock):
    async with start_app(sms_callback_secret="s3cret", render_timeout_ms=200) as (client, app):
        runtime = app.state.runtime
        [relay] = runtime.relays
        # Hold the relay's lock: rows stay in the outbox for the test to read instead of being published.
        async with runtime.engine.connect() as holder:
            await holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": relay.lock_key})
            await seed_contact(app, "ob-1", phone="+14155550101", consents={"sms": True})
            await seed_contact(app, "ob-2", phone="+14155550102", consents={"sms": False})
            await add_template(client, "code", "sms", body="Your code")
            await add_template(client, "named", "sms", body="Hi {{ name }}", variables=["name"])
            await add_template(
                client,
                "runaway",
                "sms",
                body="{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}",
            )
            later = clock.now() + timedelta(hours=2)
            for body in (
                {"id": "ob-sent", "customer_id": "ob-1", "template": "code"},
                {"id": "ob-failed", "customer_id": "ob-1", "template": "named"},  # its variable is missing
                {"id": "ob-timeout", "customer_id": "ob-1", "template": "runaway"},
                {"id": "ob-suppressed", "customer_id": "ob-2", "template": "code", "kind": "marketing"},
                {
                    "id": "ob-expired",
                    "customer_id": "ob-1",
                    "template": "code",
                    "not_before": later.isoformat(),
                    "expires_at": (clock.now() + timedelta(hours=1)).isoformat(),
                },
            ):
                assert (await client.post("/v1/messages", json=body)).status_code == 202
            sent = await wait_for_state(client, "ob-sent", "sent", what="sent")
            await wait_for_state(client, "ob-failed", "failed", what="failed at render")
            await wait_for_state(client, "ob-timeout", "failed", what="failed by the render budget")
            assert (await message_state(client, "ob-suppressed"))["state"] == "suppressed"

            report = orjson.dumps({"provider_message_id": sent["provider_message_id"], "status": "delivered"})
            r = await client.post(
                "/v1/providers/sms/callbacks",
                content=report,
                headers={"X-Signature": callback_signature("s3cret", report)},
            )
            assert r.json()["applied"] is True
            links = app.state.notifier.links
            assert (await client.get(links.open_url("ob-sent").removeprefix("http://test"))).status_code == 200
            click = links.click_url("ob-sent", "https://shop.example/").removeprefix("http://test")
            assert (await client.get(click)).status_code == 302
            unsubscribe = links.unsubscribe_url("ob-sent", "ob-1", "sms").removeprefix("http://test")
            assert (await client.post(unsubscribe)).status_code == 200
            clock.advance(hours=1, minutes=1)
            assert (await client.post("/v1/ops/sweeps/expire_messages")).json()["result"] == 1

            rows = await _outbox(app)
            await holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": relay.lock_key})

    by_message_status = {}
    for topic, key, value in rows:
        assert topic == TOPIC_DELIVERIES
        model = TOPIC_MODELS[topic]
        event = model.model_validate(value)
        # Nothing more or less than the model: the row is the model's own JSON.
        assert event.model_dump(mode="json") == value
        assert key == event.customer_id and event.id.startswith(f"{event.message_id}:")
        by_message_status[(event.message_id, event.status)] = event
    assert {status for _, status in by_message_status} == set(get_args(DeliveryStatus))
    assert len(rows) == len(by_message_status) == 9
    assert by_message_status[("ob-timeout", "failed")].reason == "render_timeout"
    assert by_message_status[("ob-failed", "failed")].reason == "render_failed: missing variables: name"
    assert by_message_status[("ob-suppressed", "suppressed")].reason == "no_consented_channel"
    assert by_message_status[("ob-expired", "expired")].reason == "expired"
    assert by_message_status[("ob-sent", "clicked")].url == "https://shop.example/"
    assert by_message_status[("ob-sent", "sent")].channel == "sms"
