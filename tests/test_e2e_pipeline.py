"""Across services, through Kafka: a POS posts events to ingest; loyalty accrues points; when they
are about to expire, loyalty asks for a transactional message and the notifier e-mails the customer
through a real SMTP server, once, with the amount and the date. One shared clock drives time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from crm_common.testing.helpers import eventually, run_app, smtp_mailbox, stack_settings
from ingest.app import create_app as ingest_app
from ingest.keys import ensure_bootstrap_key
from ingest.settings import Settings as IngestSettings
from loyalty.app import create_app as loyalty_app
from loyalty.settings import Settings as LoyaltySettings
from notifier.app import create_app as notifier_app
from notifier.settings import Settings as NotifierSettings


@pytest.fixture
def mailbox():
    with smtp_mailbox() as (box, port):
        yield box, port


def on_stack(settings_cls: type, url: str, broker: Any, prefix: str, **overrides: Any) -> Any:
    """The service with its consumers running, on the test stack."""
    return stack_settings(
        settings_cls,
        database_url=url,
        bootstrap=broker.bootstrap,
        topic_prefix=prefix,
        consumers_enabled=True,
        kafka_consumer_batch_timeout_ms=100,
        **overrides,
    )


async def test_points_expiry_reminder_travels_from_pos_event_to_an_email(
    make_database, broker, topic_prefix, clock, mailbox
):
    box, smtp_port = mailbox
    ingest_url = await make_database("ingest")
    await ensure_bootstrap_key(ingest_url, "e2e-key")
    ingest = ingest_app(on_stack(IngestSettings, ingest_url, broker, topic_prefix), clock=clock)
    loyalty = loyalty_app(on_stack(LoyaltySettings, await make_database("loyalty"), broker, topic_prefix), clock=clock)
    notifier = notifier_app(
        on_stack(
            NotifierSettings,
            await make_database("notifier"),
            broker,
            topic_prefix,
            smtp_port=smtp_port,
            public_base_url="http://test",
            dispatch_poll_interval_s=0.1,
        ),
        clock=clock,
    )
    auth = {"Authorization": "Bearer e2e-key"}
    async with run_app(ingest) as pos, run_app(loyalty) as loy, run_app(notifier) as note:
        # The notifier ships a default English template for this transactional message.
        templates = (await note.get("/v1/templates")).json()
        assert any(t["key"] == "points_expiring" and t["channel"] == "email" for t in templates["items"])
        now = clock.now()
        events = [
            {
                "event_id": "e2e-cu-1",
                "type": "customer_updated",
                "customer_id": "e2e-anna",
                "occurred_at": now.isoformat(),
                "properties": {"email": "anna@example.com", "first_name": "Anna", "consents": {"email": True}},
            },
            {
                "event_id": "e2e-p-1",
                "type": "purchase",
                "customer_id": "e2e-anna",
                "occurred_at": now.isoformat(),
                "properties": {
                    "order_id": "o-1",
                    "items": [
                        {"sku": "wine-1", "name": "Rioja", "category": "wine", "quantity": 2, "unit_price": "50.00"}
                    ],
                    "total": "100.00",
                    "currency": "EUR",
                },
            },
        ]
        r = await pos.post("/v1/events", json={"events": events}, headers=auth)
        assert r.status_code == 202 and r.json()["accepted"] == 2, r.text
        # The same events again (a POS retry) change nothing downstream.
        r = await pos.post("/v1/events", json={"events": events}, headers=auth)
        assert r.json()["duplicates"] == 2

        async def account() -> dict[str, Any] | None:
            resp = await loy.get("/v1/accounts/e2e-anna")
            return resp.json() if resp.status_code == 200 else None

        acct = await eventually(account, timeout=60, what="points accrued")
        # 1% of 100.00 is worth 1.00; at the default point value of 0.01 that is 100 points.
        assert (acct["balance"], acct["balance_value"]) == ("100.00", "1.00")

        async def contact_known() -> bool:
            resp = await note.get("/v1/customers/e2e-anna/contact")
            return resp.status_code == 200 and resp.json().get("email") == "anna@example.com"

        await eventually(contact_known, timeout=60, what="notifier learned the contact")

        # 167 days later the points are 13 days from expiry (180-day programme, 14-day reminder).
        clock.advance(timedelta(days=167))
        reminders = []
        for _ in range(2):  # a second sweep must not ask again
            r = await loy.post("/v1/ops/sweeps/expiry")
            assert r.status_code == 200, r.text
            reminders.append(r.json()["result"]["reminders"])
        assert reminders == [1, 0]

        await eventually(lambda: len(box.messages) >= 1, timeout=60, what="the reminder e-mail")
        mail = box.messages[0]
        assert "anna@example.com" in str(mail["To"])
        expires_on = (now + timedelta(days=180)).date().isoformat()
        assert str(mail["Subject"]) == f"100.00 bonus points expire on {expires_on}"
        text = mail.get_body(preferencelist=("plain",)).get_content()
        assert "100.00 of your bonus points (worth 1.00)" in text and expires_on in text

        await eventually(lambda: _states(note), timeout=20, what="message recorded as sent")
    assert len(box.messages) == 1, "the reminder must be sent exactly once"


async def _states(note: Any) -> bool:
    history = (await note.get("/v1/customers/e2e-anna/messages")).json()
    return [m["state"] for m in history["items"] if m["template"] == "points_expiring"] == ["sent"]
