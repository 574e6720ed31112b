from offers.settings import TOPIC_SEGMENTS

from . import factories as f


async def test_smoke(make_stack, clock):
    async with make_stack() as st:
        r = await st.notifier.post("/v1/templates", json=f.template("wine_offer", "email"))
        assert r.status_code == 201, r.text
        c = await st.create(f.campaign("wine", {"kind": "segment_entered", "segment_key": "friday_wine_lovers"},
                                       "wine_offer", offer={"kind": "percent", "value": "20", "target": "favourite_product"}))
        assert c["state"] == "active"
        profile = {"first_name": "Ann", "favourite_product": {"sku": "w1", "name": "Rioja"}, "value_tier": "core"}
        await st.publish(TOPIC_SEGMENTS, [f.segment_entered(f"c{i}", "friday_wine_lovers", clock.now(), profile) for i in range(50)])
        import asyncio
        from crm_common.testing.helpers import eventually
        await eventually(lambda: st.sql("SELECT 1 FROM decisions"), timeout=30)
        print(await st.sql("SELECT outcome, count(*) FROM decisions GROUP BY 1"))
        print((await st.outbox_messages())[:1])
