"""The campaign API: lifecycle and versions, refusals that name the field, nothing half-saved."""

from __future__ import annotations

from datetime import timedelta

from crm_common.infra import free_port

from . import factories as f

WINE = {"kind": "segment_entered", "segment_key": "friday_wine_lovers"}


async def test_lifecycle_draft_active_paused_ended_and_versions(make_stack):
    async with make_stack() as st:
        await st.templates("t_life", "email")
        c = await st.create(f.campaign("Life", WINE, "t_life"), activate=False)
        assert (c["state"], c["version"]) == ("draft", 1)
        cid = c["id"]
        # A draft is edited in place.
        r = await st.offers.patch(f"/v1/campaigns/{cid}", json={"name": "Life 2"})
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["definition"]["name"]) == (1, "Life 2")
        assert (await st.offers.post(f"/v1/campaigns/{cid}/resume")).status_code == 409
        assert (await st.offers.post(f"/v1/campaigns/{cid}/activate")).json()["state"] == "active"
        # An edit of an active campaign makes a new version; the old one is kept.
        r = await st.offers.patch(f"/v1/campaigns/{cid}", json={"control_share": 0.2})
        assert (r.json()["version"], r.json()["state"]) == (2, "active")
        versions = (await st.offers.get(f"/v1/campaigns/{cid}/versions")).json()
        assert [v["version"] for v in versions] == [1, 2]
        assert versions[0]["definition"]["control_share"] is None
        assert versions[1]["definition"]["control_share"] == 0.2
        assert (await st.offers.post(f"/v1/campaigns/{cid}/pause")).json()["state"] == "paused"
        assert (await st.offers.post(f"/v1/campaigns/{cid}/pause")).status_code == 409
        assert (await st.offers.post(f"/v1/campaigns/{cid}/resume")).json()["state"] == "active"
        ended = (await st.offers.post(f"/v1/campaigns/{cid}/end")).json()
        assert ended["state"] == "ended" and ended["ended_at"]
        r = await st.offers.patch(f"/v1/campaigns/{cid}", json={"name": "again"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_transition"
        listed = (await st.offers.get("/v1/campaigns", params={"state": "ended"})).json()
        assert [x["id"] for x in listed["items"]] == [cid]
        assert (await st.offers.get("/v1/campaigns/cmp_missing")).status_code == 404


async def test_bad_definitions_are_422_naming_the_field_and_nothing_is_saved(make_stack, clock):
    async with make_stack() as st:
        await st.templates("t_bad", "email")

        async def refused(body: dict, field: str) -> str:
            r = await st.offers.post("/v1/campaigns", json=body)
            assert r.status_code == 422, r.text
            text = r.text
            assert field in text, text
            return text

        msg = await refused(
            f.campaign("x", {"kind": "segment_entered", "segment_key": "no_such_seg"}, "t_bad"), "trigger.segment_key"
        )
        assert "unknown segment key 'no_such_seg'" in msg
        await refused(
            f.campaign("x", WINE, "t_bad", audience={"exclude_segments": ["core", "nope"]}),
            "audience.exclude_segments.1",
        )
        assert "unknown template" in await refused(f.campaign("x", WINE, "t_missing"), "delivery.template")
        msg = await refused(
            {**f.campaign("x", WINE, "t_bad"), "delivery": {"template": "t_bad", "channel": "sms"}}, "delivery.template"
        )
        assert "no template for any allowed channel" in msg
        await refused({**f.campaign("x", WINE, "t_bad"), "control_share": 0.6}, "control_share")
        past = (clock.now() - timedelta(days=2)).date().isoformat()
        await refused(
            f.campaign("x", {"kind": "schedule", "date": past, "local_time": "10:00"}, "t_bad"), "trigger.date"
        )
        await refused(
            f.campaign("x", {"kind": "purchase_window", "min_days": 14, "max_days": 7}, "t_bad"), "can never be met"
        )
        await refused(f.campaign("x", WINE, "t_bad", offer={"kind": "percent", "value": "120"}), "offer")
        await refused(
            f.campaign(
                "x", WINE, "t_bad", offer={"kind": "percent", "value": "10"}, audience={"tiers": ["unprofitable"]}
            ),
            "audience.tiers",
        )
        assert (await st.offers.get("/v1/campaigns")).json()["total"] == 0
        # A good one, then a bad edit: the saved campaign is unchanged.
        c = await st.create(f.campaign("ok", WINE, "t_bad"))
        r = await st.offers.patch(
            f"/v1/campaigns/{c['id']}", json={"trigger": {"kind": "segment_entered", "segment_key": "gone"}}
        )
        assert r.status_code == 422 and "trigger.segment_key" in r.text
        again = (await st.offers.get(f"/v1/campaigns/{c['id']}")).json()
        assert (again["version"], again["definition"]["trigger"]["segment_key"]) == (1, "friday_wine_lovers")


async def test_activation_is_refused_when_its_segment_was_deleted(make_stack):
    async with make_stack() as st:
        await st.templates("t_del", "email")
        r = await st.seg.post(
            "/v1/segments",
            json={"key": "soon_gone", "name": "Soon gone", "rule": {"attr": "orders", "op": ">=", "value": 1}},
        )
        assert r.status_code == 201, r.text
        c = await st.create(
            f.campaign("x", {"kind": "segment_entered", "segment_key": "soon_gone"}, "t_del"), activate=False
        )
        assert (await st.seg.delete("/v1/segments/soon_gone")).status_code == 204
        r = await st.offers.post(f"/v1/campaigns/{c['id']}/activate")
        assert r.status_code == 422 and "trigger.segment_key" in r.text
        assert (await st.offers.get(f"/v1/campaigns/{c['id']}")).json()["state"] == "draft"


async def test_segmentation_down_at_create_is_503_with_retry_after_and_nothing_saved(make_stack):
    async with make_stack(segmentation_url=f"http://127.0.0.1:{free_port()}") as st:
        await st.templates("t_down", "email")
        r = await st.offers.post("/v1/campaigns", json=f.campaign("x", WINE, "t_down"))
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "peer_unavailable"
        assert (await st.offers.get("/v1/campaigns")).json()["total"] == 0


async def test_hostile_query_ids_are_refused_naming_the_field(make_stack):
    async with make_stack() as st:
        for value in ("\x00", "c\x00x", " "):
            r = await st.offers.get("/v1/customers/c1/decisions", params={"campaign_id": value})
            assert r.status_code == 422, (repr(value), r.status_code, r.text)
            assert "campaign_id" in r.text
        r = await st.offers.get("/v1/customers/c1/decisions", params={"campaign_id": "cmp_none"})
        assert r.status_code == 200 and r.json() == []
