"""Channel choice, consent, quiet hours in the customer's time zone, the marketing cap, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from crm_common.testing.helpers import eventually
from notifier.policy import choose_channel, quiet_until

from .conftest import add_template, message_state, seed_contact, wait_for_state, wake


def contact(**kw):
    base = dict(
        email=None,
        phone=None,
        push_tokens=[],
        preferred_channel=None,
        consent_email=None,
        consent_sms=None,
        consent_push=None,
    )
    return SimpleNamespace(**(base | kw))


ALL = {"email", "sms", "push"}


def test_policy_prefers_the_customers_channel_then_the_cheapest_consented():
    c = contact(
        email="a@b.cd",
        phone="+14155550101",
        push_tokens=["t"],
        consent_email=True,
        consent_sms=True,
        consent_push=True,
    )
    assert choose_channel(contact=c, kind="marketing", requested=None, template_channels=ALL).channel == "push"
    c.preferred_channel = "sms"
    assert choose_channel(contact=c, kind="marketing", requested=None, template_channels=ALL).channel == "sms"
    c.consent_sms = False
    assert choose_channel(contact=c, kind="marketing", requested=None, template_channels=ALL).channel == "push"
    c.consent_push = None
    assert choose_channel(contact=c, kind="marketing", requested=None, template_channels=ALL).channel == "email"
    assert (
        choose_channel(contact=c, kind="marketing", requested=None, template_channels={"sms", "push"}).action
        == "suppress"
    )
    # Transactional messages need an address, not marketing consent.
    assert choose_channel(contact=c, kind="transactional", requested=None, template_channels={"sms"}).channel == "sms"


def test_explicit_channel_without_consent_is_suppressed_with_the_reason():
    c = contact(phone="+14155550101", consent_sms=False)
    d = choose_channel(contact=c, kind="marketing", requested="sms", template_channels=ALL)
    assert (d.action, d.reason) == ("suppress", "no_consent:sms")
    d = choose_channel(contact=c, kind="marketing", requested="email", template_channels=ALL)
    assert (d.action, d.reason) == ("suppress", "no_address:email")


def test_quiet_hours_end_at_the_local_morning_across_midnight_and_dst():
    ny = ZoneInfo("America/New_York")
    q = (time(21), time(9))
    at = datetime(2026, 1, 5, 2, 30, tzinfo=UTC)  # 21:30 in New York on the 4th
    assert quiet_until(now=at, tz=ny, start=q[0], end=q[1]) == datetime(2026, 1, 5, 14, 0, tzinfo=UTC)
    at = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # 07:00 in New York
    assert quiet_until(now=at, tz=ny, start=q[0], end=q[1]) == datetime(2026, 1, 5, 14, 0, tzinfo=UTC)
    assert quiet_until(now=datetime(2026, 1, 5, 15, 0, tzinfo=UTC), tz=ny, start=q[0], end=q[1]) is None
    # The night of the spring-forward change: 09:00 local is already EDT (UTC-4).
    at = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)
    assert quiet_until(now=at, tz=ny, start=q[0], end=q[1]) == datetime(2026, 3, 8, 13, 0, tzinfo=UTC)


async def test_quiet_hours_defer_a_marketing_message_to_the_local_morning(start_app, provider, clock):
    async with start_app() as (client, app):
        # 12:00 UTC is 07:00 in New York: quiet until 09:00 local, 14:00 UTC.
        await seed_contact(app, "ny", phone="+12125550101", consents={"sms": True}, timezone="America/New_York")
        await add_template(client, "sale", "sms", body="Sale")
        await client.post(
            "/v1/messages",
            json={"id": "q-1", "customer_id": "ny", "template": "sale", "kind": "marketing"},
        )
        await client.post(
            "/v1/messages",
            json={"id": "q-tx", "customer_id": "ny", "template": "sale", "kind": "transactional"},
        )
        msg = await message_state(client, "q-1")
        assert msg["state"] == "deferred" and msg["reason"] == "quiet_hours"
        assert msg["next_attempt_at"] == "2026-01-05T14:00:00Z"
        await eventually(
            lambda: [b for b in provider.bodies("/v1/sms") if b["reference"] == "q-tx"],
            what="transactional sent",
        )
        clock.advance(hours=1, minutes=59)
        wake(app)
        await app.state.notifier.dispatcher.run_once()
        assert (await message_state(client, "q-1"))["state"] == "deferred"
        assert not [b for b in provider.bodies("/v1/sms") if b["reference"] == "q-1"]
        clock.advance(minutes=1)
        wake(app)

        await wait_for_state(client, "q-1", "sent", what="sent at 09:00 local")
        assert len([b for b in provider.bodies("/v1/sms") if b["reference"] == "q-1"]) == 1


async def test_the_cap_suppresses_the_fourth_marketing_message_in_seven_days(start_app, provider, clock):
    async with start_app() as (client, app):
        await seed_contact(app, "cap", phone="+14155550101", consents={"sms": True})
        await add_template(client, "promo", "sms", body="Promo")
        for i in range(3):
            await client.post(
                "/v1/messages",
                json={
                    "id": f"cap-{i}",
                    "customer_id": "cap",
                    "template": "promo",
                    "kind": "marketing",
                },
            )
            clock.advance(days=1)
        fourth = await client.post(
            "/v1/messages",
            json={"id": "cap-3", "customer_id": "cap", "template": "promo", "kind": "marketing"},
        )
        assert fourth.json()["state"] == "suppressed" and fourth.json()["reason"] == "frequency_cap"
        receipt = await client.post(
            "/v1/messages",
            json={
                "id": "cap-tx",
                "customer_id": "cap",
                "template": "promo",
                "kind": "transactional",
            },
        )
        assert receipt.json()["state"] == "pending"
        clock.advance(days=4, minutes=1)  # the first one leaves the 7-day window
        fifth = await client.post(
            "/v1/messages",
            json={"id": "cap-4", "customer_id": "cap", "template": "promo", "kind": "marketing"},
        )
        assert fifth.json()["state"] == "pending"
        wake(app)

        async def all_sent():
            refs = {b["reference"] for b in provider.bodies("/v1/sms")}
            return {"cap-0", "cap-1", "cap-2", "cap-tx", "cap-4"} <= refs

        await eventually(all_sent, what="allowed messages sent")
        assert "cap-3" not in {b["reference"] for b in provider.bodies("/v1/sms")}
        events = (await message_state(client, "cap-3"))["events"]
        assert [(e["status"], e["reason"]) for e in events] == [("suppressed", "frequency_cap")]


async def test_past_expiry_is_expired_and_unknown_contact_waits_then_is_suppressed(start_app, provider, clock):
    async with start_app(contact_wait_s=60) as (client, app):
        await add_template(client, "t", "sms", body="x")
        r = await client.post(
            "/v1/messages",
            json={
                "id": "old",
                "customer_id": "nobody",
                "template": "t",
                "expires_at": (clock.now() - timedelta(seconds=1)).isoformat(),
            },
        )
        assert r.json()["state"] == "expired"
        r = await client.post("/v1/messages", json={"id": "early", "customer_id": "later", "template": "t"})
        assert r.json()["state"] == "deferred" and r.json()["reason"] == "awaiting_contact"
        await seed_contact(app, "later", phone="+14155550199")
        clock.advance(seconds=31)
        wake(app)

        await wait_for_state(client, "early", "sent", what="sent once the contact arrived")
        r = await client.post("/v1/messages", json={"id": "ghost", "customer_id": "ghost", "template": "t"})
        clock.advance(seconds=61)
        wake(app)

        async def suppressed():
            m = await message_state(client, "ghost")
            return m["state"] == "suppressed" and m["reason"] == "unknown_contact"

        await eventually(suppressed, what="unknown contact suppressed")


async def test_consent_withdrawn_while_a_message_waits_suppresses_it_at_send_time(start_app, provider, clock):
    async with start_app(dispatcher_enabled=False) as (client, app):
        await seed_contact(app, "ny2", phone="+12125550102", consents={"sms": True}, timezone="America/New_York")
        await add_template(client, "sale", "sms", body="Sale")
        r = await client.post(
            "/v1/messages", json={"id": "w-1", "customer_id": "ny2", "template": "sale", "kind": "marketing"}
        )
        assert r.json()["state"] == "deferred"  # 07:00 in New York
        await seed_contact(app, "ny2", at=clock.now(), consents={"sms": False})
        clock.advance(hours=2)
        assert await app.state.notifier.dispatcher.run_once() == 1
        msg = await message_state(client, "w-1")
        assert (msg["state"], msg["reason"]) == ("suppressed", "no_consented_channel")
        assert not [b for b in provider.bodies("/v1/sms") if b["reference"] == "w-1"]
