"""POST /v1/events against the real PostgreSQL and broker: acceptance, duplicates, validation, limits."""

from __future__ import annotations

from datetime import timedelta

import orjson
from sqlalchemy import text

from crm_common.contract.events import EventMessage
from crm_common.testing.helpers import eventually, read_topic

from .conftest import POS_KEY
from .factories import custom, purchase


async def relay_idle(ingest) -> bool:
    async with ingest.sessionmaker() as s:
        return (await s.execute(text("SELECT count(*) FROM event_pending_batches"))).scalar() == 0


async def test_purchase_is_accepted_archived_and_published_keyed_by_customer(ingest):
    now = ingest.clock.now()
    r = await ingest.post(purchase("p-1", customer_id="cust-42", occurred_at=now - timedelta(minutes=1)))
    assert r.status_code == 202, r.text
    assert r.json() == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": 0,
        "results": [{"index": 0, "event_id": "p-1", "status": "accepted", "errors": []}],
    }
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1)
    assert len(got) == 1
    msg = EventMessage.model_validate(got[0])
    assert msg.id == "pos:p-1" and msg.source == "pos" and msg.customer_id == "cust-42"
    assert got[0]["_key"] == "cust-42"
    assert msg.received_at == now
    assert msg.properties["total"] == "13.50" and len(msg.properties["items"]) == 3

    shown = await ingest.client.get("/v1/events/pos/p-1", headers=ingest.auth)
    assert shown.status_code == 200
    assert shown.json()["message"]["id"] == "pos:p-1"
    assert shown.json()["pending"] is False
    missing = await ingest.client.get("/v1/events/pos/nope", headers=ingest.auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_resent_event_id_is_duplicate_and_not_published_again(ingest):
    now = ingest.clock.now()
    first = await ingest.post(purchase("dup-1", occurred_at=now))
    assert first.json()["accepted"] == 1
    await eventually(lambda: relay_idle(ingest), what="first copy published")
    # Same event_id with a different body: still a duplicate, the first body stays.
    again = await ingest.post({"events": [purchase("dup-1", customer_id="someone-else", occurred_at=now, items=1)]})
    assert again.status_code == 202
    assert again.json()["duplicates"] == 1 and again.json()["accepted"] == 0
    assert again.json()["results"][0]["status"] == "duplicate"
    single = await ingest.post(purchase("dup-1", occurred_at=now))
    assert single.status_code == 202 and single.json()["results"][0]["status"] == "duplicate"
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1, idle=1.0)
    assert [m["id"] for m in got] == ["pos:dup-1"]
    assert got[0]["customer_id"] == "c1"


async def test_same_event_twice_in_one_batch_is_published_once(ingest):
    now = ingest.clock.now()
    r = await ingest.post({"events": [purchase("twice", occurred_at=now), purchase("twice", occurred_at=now)]})
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "duplicate"]
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=1)
    assert [m["id"] for m in got] == ["pos:twice"]


async def test_batch_of_ten_with_three_invalid_accepts_seven_and_names_the_failing_fields(ingest):
    now = ingest.clock.now()
    events = [purchase(f"b-{i}", customer_id=f"c{i}", occurred_at=now) for i in range(10)]
    events[2]["properties"]["items"][1]["unit_price"] = "-3"
    del events[5]["customer_id"]
    events[8]["occurred_at"] = (now + timedelta(hours=1)).isoformat()
    r = await ingest.post({"events": events})
    assert r.status_code == 202
    body = r.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (7, 0, 3)
    statuses = [x["status"] for x in body["results"]]
    assert [i for i, s in enumerate(statuses) if s == "rejected"] == [2, 5, 8]
    assert [x["index"] for x in body["results"]] == list(range(10))
    assert body["results"][2]["errors"][0]["loc"] == ["properties", "items", 1, "unit_price"]
    assert body["results"][5]["errors"][0]["loc"] == ["customer_id"]
    assert body["results"][8]["errors"][0]["loc"] == ["occurred_at"]
    assert body["results"][8]["event_id"] == "b-8"
    got = await read_topic(ingest.bootstrap, ingest.topic, min_count=7)
    assert sorted(m["event_id"] for m in got) == sorted(f"b-{i}" for i in range(10) if i not in (2, 5, 8))


async def test_batch_entries_that_are_not_objects_are_rejected_by_index(ingest):
    now = ingest.clock.now()
    r = await ingest.post({"events": [None, 7, "x", [], purchase("obj-ok", occurred_at=now)]})
    assert r.status_code == 202
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (1, 4)
    assert [x["status"] for x in body["results"]] == ["rejected"] * 4 + ["accepted"]
    first = body["results"][0]["errors"][0]
    assert first["loc"] == [] and "JSON object" in first["msg"] and "null" in first["msg"]
    assert "an array" in body["results"][3]["errors"][0]["msg"]


async def test_single_invalid_event_is_422_with_field_errors(ingest):
    now = ingest.clock.now()
    bad = purchase("bad-1", occurred_at=now)
    bad["properties"]["currency"] = "euro"
    bad["properties"]["bogus"] = 1
    r = await ingest.post(bad)
    assert r.status_code == 422
    body = r.json()
    assert body["rejected"] == 1 and body["results"][0]["status"] == "rejected"
    locs = {tuple(e["loc"]) for e in body["error"]["details"]}
    assert ("properties", "currency") in locs and ("properties", "bogus") in locs
    unknown_type = await ingest.post({**purchase("bad-2", occurred_at=now), "type": "teleport"})
    assert unknown_type.status_code == 422 and unknown_type.json()["error"]["details"][0]["loc"] == ["type"]


async def test_authentication_and_scopes(ingest):
    now = ingest.clock.now()
    body = purchase("auth-1", occurred_at=now)
    missing = await ingest.client.post("/v1/events", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong_scheme = await ingest.client.post("/v1/events", json=body, headers={"Authorization": f"Basic {POS_KEY}"})
    assert wrong_scheme.status_code == 401
    unknown = await ingest.post(body, key="not-a-key")
    assert unknown.status_code == 401
    await ingest.add_key("read-only", scopes=["events:read"])
    forbidden = await ingest.post(body, key="read-only")
    assert forbidden.status_code == 403 and "events:write" in forbidden.json()["error"]["message"]
    replay = await ingest.client.post(
        "/v1/replay",
        json={"from": now.isoformat(), "to": (now + timedelta(hours=1)).isoformat()},
        headers={"Authorization": "Bearer read-only"},
    )
    assert replay.status_code == 403
    keys = await ingest.client.get("/v1/keys", headers={"Authorization": "Bearer read-only"})
    assert keys.status_code == 403
    # A site key reads site events only; nothing was accepted from the refused calls.
    await ingest.add_key("site-reader", source="site", scopes=["events:read"])
    other = await ingest.client.get("/v1/events/pos/auth-1", headers={"Authorization": "Bearer site-reader"})
    assert other.status_code == 403
    assert (await ingest.client.get("/v1/events/pos/auth-1", headers=ingest.auth)).status_code == 404


async def test_too_many_events_or_bytes_is_413_saying_the_limit(ingest):
    now = ingest.clock.now()
    many = {"events": [custom(f"m-{i}", occurred_at=now) for i in range(1001)]}
    r = await ingest.post(many)
    assert r.status_code == 413 and "1000 events" in r.json()["error"]["message"]
    big = {"events": [custom("big", occurred_at=now, blob="x" * 9000) for _ in range(120)]}
    raw = orjson.dumps(big)
    assert len(raw) > 1 << 20
    r = await ingest.client.post("/v1/events", content=raw, headers={**ingest.auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and "1 MiB" in r.json()["error"]["message"]

    async def chunks():
        for i in range(0, len(raw), 65536):
            yield raw[i : i + 65536]

    # No Content-Length (chunked): the limit holds on the bytes actually read.
    r = await ingest.client.post(
        "/v1/events", content=chunks(), headers={**ingest.auth, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "1048576 bytes" in r.json()["error"]["message"]
    assert await relay_idle(ingest)
    async with ingest.sessionmaker() as s:
        assert (await s.execute(text("SELECT count(*) FROM events"))).scalar() == 0


async def test_rate_limit_answers_429_with_retry_after(ingest):
    now = ingest.clock.now()
    await ingest.add_key("slow-key", rate=5)
    ok = await ingest.post({"events": [custom(f"r-{i}", occurred_at=now) for i in range(5)]}, key="slow-key")
    assert ok.status_code == 202
    limited = await ingest.post(custom("r-5", occurred_at=now), key="slow-key")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"
    # Other keys are not affected.
    assert (await ingest.post(custom("r-6", occurred_at=now))).status_code == 202


async def test_a_key_limited_below_one_event_per_second_is_not_refused_forever(ingest):
    now = ingest.clock.now()
    await ingest.add_key("trickle-key", rate=0.5)
    first = await ingest.post(custom("t-0", occurred_at=now), key="trickle-key")
    assert first.status_code == 202, first.text
    limited = await ingest.post(custom("t-1", occurred_at=now), key="trickle-key")
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) == 2


def test_rate_limiter_lets_a_sub_one_rate_through_when_its_bucket_is_full():
    import uuid

    from ingest.ratelimit import RateLimiter

    limiter, key = RateLimiter(), uuid.uuid4()
    assert limiter.exhausted(key, 0.25) is None
    assert limiter.retry_after(key, 0.25, cost=1) is None
    assert limiter.exhausted(key, 0.25) == 4


async def test_a_numeric_occurred_at_is_refused_like_a_timestamp_without_offset(ingest):
    now = ingest.clock.now()
    valid = custom("n-ok", occurred_at=now)
    numbers = [0, 1_764_612_000, "1764612000", 1_764_612_000_000, 1.5e9, "1.5e9"]
    batch = [valid] + [{**custom(f"n-{i}", occurred_at=now), "occurred_at": v} for i, v in enumerate(numbers)]
    r = await ingest.post({"events": batch})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (1, len(numbers))
    for result in body["results"][1:]:
        assert result["status"] == "rejected"
        assert result["errors"] == [
            {
                "loc": ["occurred_at"],
                "msg": "must be an RFC 3339 timestamp with an offset, such as 2026-01-05T11:58:00+01:00, not a number",
            }
        ]
    single = await ingest.post({**custom("n-single", occurred_at=now), "occurred_at": 0, "customer_id": ""})
    assert single.status_code == 422
    assert [e["loc"] for e in single.json()["error"]["details"]] == [["customer_id"], ["occurred_at"]]


async def test_hostile_bodies_get_4xx_never_500(ingest):
    now = ingest.clock.now()
    h = {**ingest.auth, "Content-Type": "application/json"}
    deep = b'{"events": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    nested_props: dict = {}
    cur = nested_props
    for _ in range(50):
        cur["a"] = {}
        cur = cur["a"]
    bodies = [
        b"{not json",
        b"",
        b"null",
        b"[1, 2]",
        b'"just a string"',
        b'{"events": "nope"}',
        b'{"events": []}',
        b'{"events": [1, null, "x"]}',
        b'{"events": [], "extra": 1}',
        deep,
        b"\xff\xfe\x00",
        b'{"event_id": "x", "amount": 1e999}',
        orjson.dumps(purchase("nul\x00id", occurred_at=now)),
        orjson.dumps(custom("nul-prop", occurred_at=now, note="a\x00b")),
        orjson.dumps(custom("nul-key", occurred_at=now, **{"k\x00": 1})),
        orjson.dumps(custom("deep", occurred_at=now, tree=nested_props)),
        orjson.dumps(custom("huge-int", occurred_at=now, n=2**63 - 1)),
        b'{"event_id": "huge", "type": "custom", "customer_id": "c", "occurred_at": "2026-01-05T12:00:00Z", '
        b'"properties": {"name": "n", "n": 123456789012345678901234567890123456789}}',
        orjson.dumps(
            {
                **purchase("huge-price", occurred_at=now),
                "properties": {**purchase("x", occurred_at=now)["properties"], "total": "1e400"},
            }
        ),
        orjson.dumps({**purchase("old", occurred_at=now), "occurred_at": "0001-01-01T00:00:00+00:00"}),
        orjson.dumps({**purchase("naive", occurred_at=now), "occurred_at": "2026-01-05T12:00:00"}),
        orjson.dumps(purchase("\u202e\U0001f600ünï", occurred_at=now)),
    ]
    for raw in bodies:
        r = await ingest.client.post("/v1/events", content=raw, headers=h)
        assert 400 <= r.status_code < 500 or r.status_code == 202, (raw[:80], r.status_code, r.text[:200])
        assert "error" in r.json() or r.status_code == 202
    r = await ingest.client.post("/v1/events", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"


async def test_lookup_with_hostile_event_id_is_4xx(ingest):
    # No event can have these ids: refused by validation, naming the parameter.
    for event_id in ("a%00b", "%20%20", "x" * 300):
        r = await ingest.client.get(f"/v1/events/pos/{event_id}", headers=ingest.auth)
        assert r.status_code == 422, (event_id, r.status_code, r.text[:200])
        assert r.json()["error"]["details"][0]["loc"] == ["path", "event_id"]
    # Odd but storable ids (an invalid UTF-8 sequence arrives as U+FFFD) are looked up and not found.
    for event_id in ("%F0%9F%98%80/with/slashes", "%ED%A0%80"):
        r = await ingest.client.get(f"/v1/events/pos/{event_id}", headers=ingest.auth)
        assert r.status_code == 404, (event_id, r.status_code, r.text[:200])
    assert (await ingest.client.get("/v1/events/moon/x", headers=ingest.auth)).status_code == 422


async def test_blank_ids_and_non_boolean_consents_are_refused_by_field(ingest):
    now = ingest.clock.now()
    blank_customer = await ingest.post(purchase("blank-1", customer_id="   ", occurred_at=now))
    assert blank_customer.status_code == 422
    assert blank_customer.json()["error"]["details"][0] == {"loc": ["customer_id"], "msg": "must not be blank"}
    blank_event = await ingest.post(purchase(" ", occurred_at=now))
    assert blank_event.status_code == 422 and blank_event.json()["error"]["details"][0]["loc"] == ["event_id"]
    yes = {
        "event_id": "consent-yes",
        "type": "customer_updated",
        "customer_id": "c-consent",
        "occurred_at": now.isoformat(),
        "properties": {"consents": {"email": "yes", "sms": 1, "push": True}},
    }
    r = await ingest.post(yes)
    assert r.status_code == 422
    locs = {tuple(e["loc"]) for e in r.json()["error"]["details"]}
    assert locs == {("properties", "consents", "email"), ("properties", "consents", "sms")}


async def test_inconsistent_purchases_and_zero_refunds_are_refused_naming_the_field(ingest):
    now = ingest.clock.now()
    wrong_total = purchase("sum-1", occurred_at=now)  # three lines of 4.50: 13.50
    wrong_total["properties"]["total"] = "14.00"
    big_discount = purchase("disc-1", occurred_at=now, items=1)
    big_discount["properties"]["items"][0]["discount"] = "4.51"
    spaced = purchase("fmt-1", occurred_at=now, items=1)
    spaced["properties"]["total"] = " 4.50 "
    zero_refund = {
        "event_id": "ref-0",
        "type": "refund",
        "customer_id": "c1",
        "occurred_at": now.isoformat(),
        "properties": {"order_id": "o-sum-1", "amount": "0"},
    }
    r = await ingest.post(
        {"events": [wrong_total, big_discount, spaced, zero_refund, purchase("ok-1", occurred_at=now)]}
    )
    assert r.status_code == 202
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (1, 4)
    first = [res["errors"][0] for res in body["results"][:4]]
    assert first[0] == {
        "loc": ["properties", "total"],
        "msg": "total 14.00 does not match the items (sum 13.50 ± 0.03, 0.01 per line)",
    }
    assert first[1]["loc"] == ["properties", "items", 0, "discount"] and "4.50" in first[1]["msg"]
    assert first[2]["loc"] == ["properties", "total"] and "plain decimal" in first[2]["msg"]
    assert first[3]["loc"] == ["properties", "amount"] and "greater than 0" in first[3]["msg"]
    single = await ingest.post(wrong_total)
    assert single.status_code == 422
    assert single.json()["error"]["details"][0]["loc"] == ["properties", "total"]
