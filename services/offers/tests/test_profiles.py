"""Models against migrations, and personalisation fields missing from the cache: read from
segmentation's API; while segmentation is down the evaluation waits and retries, never skipped."""

from __future__ import annotations

import asyncio

import httpx

from crm_common.infra import free_port
from crm_common.testing.helpers import TEST_AUTH, eventually, serve_app
from crm_common.testing.schema import schema_drift
from offers.models import Base
from offers.settings import TOPIC_EVENTS
from segmentation.app import create_app as segmentation_app
from segmentation.settings import Settings as SegmentationSettings

from . import factories as f
from .conftest import stack_settings


async def test_models_match_migrations(make_database):
    assert await schema_drift(await make_database("offers"), Base.metadata) == []


async def test_missing_profile_is_read_from_segmentation_and_waits_while_it_is_down(
    make_stack, make_database, broker, topic_prefix, clock
):
    port = free_port()
    # Every cached digest counts as stale here, so the decision must read the profile over HTTP.
    async with make_stack(
        segmentation_url=f"http://127.0.0.1:{port}", global_control_share=0.0, profile_stale_after_s=-3600
    ) as st:
        await st.templates("t_prof", "email")
        seg_db = await make_database("segmentation")

        def segmentation(consumers: bool):  # type: ignore[no-untyped-def]
            settings = stack_settings(seg_db, broker, topic_prefix, consumers_enabled=consumers)
            return segmentation_app(SegmentationSettings(**settings), clock=clock)

        tea = [{"sku": "tea-1", "name": "Green Tea", "category": "tea", "unit_price": "4"}]
        purchase = f.event(
            "purchase", "kim", clock.now(), {"order_id": "o1", "items": tea, "total": "4", "currency": "EUR"}
        )
        async with (
            serve_app(segmentation(True), port) as url,
            httpx.AsyncClient(base_url=url, headers=TEST_AUTH) as seg,
        ):
            c = await st.create(
                f.campaign(
                    "fav",
                    {"kind": "event", "event_type": "custom", "name": "opened"},
                    "t_prof",
                    offer={"kind": "percent", "value": "10", "target": "favourite_product"},
                    control_share=0,
                )
            )
            await st.publish(TOPIC_EVENTS, [purchase])

            async def profiled() -> bool:
                return (await seg.get("/v1/profiles/kim")).status_code == 200

            await eventually(profiled, timeout=30, what="segmentation's profile of kim")
        # Segmentation is down now: the event is neither decided nor dropped; the batch is retried.
        await st.publish(TOPIC_EVENTS, [f.event("custom", "kim", clock.now(), {"name": "opened"})])
        await asyncio.sleep(3)
        assert await st.decisions(c["id"]) == {}
        pipeline = (await st.offers.get("/v1/ops/pipeline")).json()
        events = next(x for x in pipeline["consumers"] if x["name"] == "offers")
        assert events["retries"] >= 1 and events["dead_lettered"] == 0
        async with serve_app(segmentation(False), port):
            await eventually(lambda: st.decisions(c["id"]), timeout=60, what="the decision once segmentation is back")
        assert await st.decisions(c["id"]) == {"kim": "requested"}
        [msg] = await st.requested(c["id"])
        assert msg["variables"]["product_name"] == "Green Tea" and msg["variables"]["discount"] == "10%"
