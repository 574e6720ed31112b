"""Scenario 1 end to end: purchases on crm.events.v1, segmentation fills `friday_wine_lovers` and
publishes each member's profile digest, offers e-mails a personal coupon on *their own* wine through
the notifier and a real SMTP server, once; control members get nothing; the notifier's verdict
(sent, or suppressed for want of consent) joins the decision log."""

from __future__ import annotations

from datetime import timedelta

import pytest
from aiosmtpd.controller import Controller

from crm_common.infra import free_port
from crm_common.testing.helpers import Mailbox, eventually
from offers.settings import TOPIC_EVENTS

from . import factories as f

WINES = [
    "Rioja Reserva",
    "Chianti Classico",
    "Sancerre",
    "Malbec Mendoza",
    "Barolo",
    "Riesling Mosel",
    "Tempranillo",
    "Pinot Noir",
    "Merlot",
    "Shiraz",
    "Cava",
    "Vinho Verde",
    "Soave",
    "Gruner",
    "Zinfandel",
    "Primitivo",
    "Cotes du Rhone",
    "Albarino",
    "Carmenere",
    "Nebbiolo",
]


@pytest.fixture
def mailbox():
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


async def test_scenario1_friday_wine_lovers_each_get_their_own_wine_once(make_stack, clock, mailbox):
    box, smtp_port = mailbox
    async with make_stack(peer_consumers=True, notifier_kw={"smtp_port": smtp_port}) as st:
        await st.templates(
            "wine_lovers",
            "email",
            body="Hello {{ first_name }}, we noticed you buy {{ product_name }}: {{ discount }} off your next "
            "purchase of {{ min_quantity }} bottles with code {{ coupon_code }}, valid until {{ valid_until }}.",
            subject="{{ discount }} off {{ product_name }}",
        )
        c = await st.create(
            f.campaign(
                "Friday wine lovers",
                {"kind": "segment_entered", "segment_key": "friday_wine_lovers"},
                "wine_lovers",
                offer={
                    "kind": "percent",
                    "value": "20",
                    "target": "favourite_product",
                    "category": "wine",
                    "min_quantity": 2,
                    "validity_days": 14,
                    "coupon": True,
                },
                delivery={"template": "wine_lovers", "channel": "email"},
                control_share=0.1,
                limits={"once_per_customer": True},
            )
        )
        now = clock.now()  # a Monday; the three Fridays before it
        fridays = [now - timedelta(days=d) for d in (3, 10, 17)]
        customers = {f"w{i:02d}": wine for i, wine in enumerate(WINES)}
        events = []
        for k, wine in customers.items():
            consent = k != "w00"  # one member never gave e-mail consent
            events.append(
                f.event(
                    "customer_updated",
                    k,
                    now - timedelta(days=30),
                    {"email": f"{k}@example.com", "first_name": k.upper(), "consents": {"email": consent}},
                )
            )
            for day in fridays:
                events.append(
                    f.event(
                        "purchase",
                        k,
                        day.replace(hour=18),
                        {
                            "order_id": f"{k}-{day.date()}",
                            "total": "30",
                            "currency": "EUR",
                            "items": [
                                {
                                    "sku": f"sku-{k}",
                                    "name": wine,
                                    "category": "wine",
                                    "quantity": "1",
                                    "unit_price": "10",
                                },
                                {
                                    "sku": "bread",
                                    "name": "Bread",
                                    "category": "bakery",
                                    "quantity": "1",
                                    "unit_price": "2",
                                },
                            ],
                        },
                    )
                )
        # A customer with two Fridays only is not a member.
        for day in fridays[:2]:
            events.append(
                f.event(
                    "purchase",
                    "two_fridays",
                    day,
                    {
                        "order_id": f"two-{day.date()}",
                        "total": "10",
                        "currency": "EUR",
                        "items": [{"sku": "sku-x", "name": "Prosecco", "category": "wine", "unit_price": "10"}],
                    },
                )
            )
        await st.publish(TOPIC_EVENTS, events)
        decided = await st.wait_decisions(len(customers), c["id"], timeout=60)
        assert set(decided) == set(customers)
        held = {k for k, o in decided.items() if o in ("control", "global_control")}
        treated = {k for k, o in decided.items() if o == "requested"}
        assert treated | held == set(customers) and treated
        expected_held = {
            r["k"]
            for r in await st.sql(
                "SELECT k FROM unnest(CAST(:ks AS text[])) AS k WHERE offers_bucket('global-control', k) < 0.05 "
                "OR offers_bucket(:c, k) < 0.1",
                ks=list(customers),
                c=c["id"],
            )
        }
        assert held == expected_held

        with_consent = treated - {"w00"}

        def mails() -> dict[str, list]:
            return {k: box.to(f"{k}@example.com") for k in customers}

        await eventually(lambda: all(mails()[k] for k in with_consent), timeout=60, what="an e-mail per member")
        got = mails()
        for k in with_consent:
            assert len(got[k]) == 1, k
            body = got[k][0].get_body(preferencelist=("plain",)).get_content()
            assert f"you buy {customers[k]}:" in body and "20% off" in body and "2 bottles" in body
            assert customers[k] in str(got[k][0]["Subject"])
        for k in held | {"w00"}:
            assert got[k] == []
        assert box.to("two_fridays@example.com") == []
        # Coupons are personal: one per member, all different.
        codes = [
            r["variables"]["coupon_code"]
            for r in await st.sql("SELECT variables FROM decisions WHERE outcome = 'requested'")
        ]
        assert len(set(codes)) == len(treated)

        # The notifier's verdict joins the decision log.
        async def verdicts() -> dict[str, str] | None:
            rows = await st.sql(
                "SELECT customer_id, delivery_status, delivery_reason FROM decisions "
                "WHERE outcome = 'requested' AND delivery_status IS NOT NULL"
            )
            return (
                {r["customer_id"]: (r["delivery_status"], r["delivery_reason"]) for r in rows}
                if len(rows) == len(treated)
                else None
            )

        joined = await eventually(verdicts, timeout=60, what="delivery verdicts")
        assert all(joined[k][0] == "sent" for k in with_consent)
        if "w00" in treated:
            assert joined["w00"] == ("suppressed", "no_consent:email")
            why = (await st.offers.get(f"/v1/campaigns/{c['id']}/why/w00")).json()
            assert not why["received"] and "no consent for email" in why["sentence"]
        some = sorted(with_consent)[0]
        why = (await st.offers.get(f"/v1/campaigns/{c['id']}/why/{some}")).json()
        assert why["received"] and "sent" in why["sentence"]
        if held:
            k = sorted(held)[0]
            why = (await st.offers.get(f"/v1/campaigns/{c['id']}/why/{k}")).json()
            assert not why["received"] and "control group" in why["sentence"]
        why = (await st.offers.get(f"/v1/campaigns/{c['id']}/why/two_fridays")).json()
        assert why["decisions"] == [] and "has not been evaluated" in why["sentence"]
