"""Ingest driven by the real Segment SDK (segment-analytics-python) over HTTP: the mapped events
arrive on crm.events.v1, duplicates, auth, gzip and rejections; then the HTTP edges by hand."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest_asyncio
import uvicorn
from segment.analytics import Client

from crm_common.infra import free_port
from crm_common.serve import KEEP_ALIVE_S
from crm_common.testing.helpers import eventually, read_topic

WRITE_KEY = "test-segment-site-key"
APP_KEY = "test-segment-app-key"


class _Server(uvicorn.Server):
    """uvicorn in the test's event loop; the test harness keeps its own signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest_asyncio.fixture(loop_scope="session")
async def segment(ingest) -> AsyncIterator[Any]:
    """The ingest app (lifespan already running) served by uvicorn on loopback, with a site key."""
    await ingest.add_key(WRITE_KEY, source="site", scopes=["events:write", "events:read"])
    await ingest.add_key(APP_KEY, source="app", scopes=["events:write", "events:read"])
    port = free_port()
    config = uvicorn.Config(
        ingest.app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for it
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    ingest.http_url = f"http://127.0.0.1:{port}"
    try:
        yield ingest
    finally:
        server.should_exit = True
        await task


def sdk(url: str, errors: list[Any], key: str = WRITE_KEY, **kw: Any) -> Client:
    """The SDK as a site backend configures it, pointed at the test server; no retries."""

    def on_error(exc: Exception, batch: list[Any]) -> None:
        errors.append((exc, batch))

    return Client(write_key=key, host=url, on_error=on_error, max_retries=0, upload_interval=0.05, **kw)


async def send(client: Client) -> None:
    await asyncio.to_thread(client.shutdown)


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def by_event_id(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["event_id"]: m for m in messages}


async def rejections(ingest: Any, source: str = "site", key: str = WRITE_KEY) -> list[dict[str, Any]]:
    r = await ingest.client.get(f"/v1/rejections?source={source}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["rejections"]


async def test_sdk_calls_arrive_as_the_mapped_contract_events(segment):
    errors: list[Any] = []
    client = sdk(segment.http_url, errors)
    client.identify(
        user_id="cust-1",
        anonymous_id="anon-1",
        traits={"email": "ann@example.com", "firstName": "Ann", "lastName": "Lee", "address": {"city": "Lyon"}},
        context={"timezone": "Europe/Paris", "locale": "fr-FR"},
        message_id="m-identify",
    )
    client.page(
        anonymous_id="anon-2",
        name="Home",
        properties={"url": "https://shop.example/?utm_source=news", "referrer": "https://news.example/"},
        context={"campaign": {"source": "newsletter", "name": "spring"}},
        message_id="m-page",
    )
    client.track(
        user_id="cust-1",
        event="Product Viewed",
        properties={"product_id": "sku-9", "category": "shoes", "name": "Runner", "price": 59.9},
        message_id="m-viewed",
    )
    client.track(
        user_id="cust-1",
        event="Order Completed",
        properties={
            "order_id": "o-1",
            "total": 23.96,
            "currency": "eur",
            "coupon": "SPRING10",
            "products": [
                {"sku": "sku-1", "name": "Socks", "category": "wear", "price": 4.99, "quantity": 3},
                {"product_id": "sku-2", "name": "Cap", "category": "wear", "price": 8.99, "quantity": 1},
            ],
        },
        message_id="m-order",
    )
    client.track(
        user_id="cust-1",
        event="Order Refunded",
        properties={"order_id": "o-1", "total": 8.99, "products": [{"sku": "sku-2", "quantity": 1, "price": 8.99}]},
        message_id="m-refund",
    )
    client.alias(previous_id="anon-2", user_id="cust-1", message_id="m-alias")
    client.track(anonymous_id="anon-2", event="Wishlist Added", properties={"sku": "sku-5"}, message_id="m-custom")
    await send(client)
    assert errors == []

    got = by_event_id(await read_topic(segment.bootstrap, segment.topic, min_count=7))
    assert set(got) == {"m-identify", "m-page", "m-viewed", "m-order", "m-refund", "m-alias", "m-custom"}
    now = segment.clock.now()
    for m in got.values():
        assert m["source"] == "site" and m["id"] == f"site:{m['event_id']}"
        # The SDK stamps with the real clock, ingest runs on the test's clock (Jan 2026): sentAt corrects it.
        assert now - timedelta(seconds=10) <= datetime.fromisoformat(m["occurred_at"]) <= now

    identify = got["m-identify"]
    assert identify["type"] == "customer_updated"
    assert (identify["customer_id"], identify["anonymous_id"]) == ("cust-1", "anon-1")
    assert identify["properties"] == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "last_name": "Lee",
        "city": "Lyon",
        "timezone": "Europe/Paris",
        "locale": "fr-FR",
    }
    page = got["m-page"]
    assert page["type"] == "site_visit" and page["customer_id"] is None and page["_key"] == "anon:anon-2"
    assert page["properties"] == {
        "page": "https://shop.example/?utm_source=news",
        "referrer": "https://news.example/",
        "utm_source": "newsletter",
        "utm_campaign": "spring",
    }
    viewed = got["m-viewed"]
    assert viewed["type"] == "product_viewed"
    assert viewed["properties"] == {"sku": "sku-9", "category": "shoes", "name": "Runner", "price": "59.90"}
    order = got["m-order"]
    assert order["type"] == "purchase" and order["_key"] == "cust-1"
    props = order["properties"]
    assert (props["order_id"], props["total"], props["currency"], props["coupon_code"]) == (
        "o-1",
        "23.96",
        "EUR",
        "SPRING10",
    )
    assert [(i["sku"], i["quantity"], i["unit_price"]) for i in props["items"]] == [
        ("sku-1", "3", "4.99"),
        ("sku-2", "1", "8.99"),
    ]
    refund = got["m-refund"]
    assert refund["type"] == "refund"
    assert refund["properties"] == {
        "order_id": "o-1",
        "amount": "8.99",
        "items": [{"sku": "sku-2", "quantity": "1", "unit_price": "8.99"}],
    }
    alias = got["m-alias"]
    assert alias["type"] == "customer_updated"
    assert (alias["customer_id"], alias["anonymous_id"], alias["properties"]) == ("cust-1", "anon-2", {})
    custom = got["m-custom"]
    assert custom["type"] == "custom" and custom["properties"]["name"] == "Wishlist Added"
    assert custom["properties"]["sku"] == "sku-5"
    assert custom["properties"]["context"]["library"]["name"] == "analytics-python"
    assert await rejections(segment) == []


async def test_a_repeated_message_id_is_a_duplicate(segment):
    errors: list[Any] = []
    for _ in range(2):
        client = sdk(segment.http_url, errors)
        client.track(
            user_id="cust-2", event="Product Viewed", properties={"sku": "s", "category": "c"}, message_id="m-1"
        )
        await send(client)
    assert errors == []
    body = {"batch": [{"type": "track", "userId": "cust-2", "event": "Signed Up", "messageId": "m-1"}]}
    again = await segment.client.post("/v1/batch", json=body, headers=basic(WRITE_KEY))
    assert again.status_code == 200
    assert again.json() == {"success": True, "accepted": 0, "duplicates": 1, "rejected": 0}
    got = await read_topic(segment.bootstrap, segment.topic, min_count=1, idle=1.0)
    assert [(m["id"], m["type"]) for m in got] == [("site:m-1", "product_viewed")]
    archived = await segment.client.get("/v1/events/site/m-1", headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert archived.status_code == 200 and archived.json()["message"]["properties"] == {"sku": "s", "category": "c"}


async def test_a_bad_write_key_is_refused_and_nothing_is_published(segment):
    errors: list[Any] = []
    client = sdk(segment.http_url, errors, key="not-a-key")
    client.track(user_id="cust-3", event="Signed Up", message_id="m-bad")
    await send(client)
    assert [e.status for e, _ in errors] == [401]
    pos = await segment.client.post("/v1/track", json={"userId": "c", "event": "x"}, headers=basic("test-pos-key"))
    assert pos.status_code == 403 and "site or app" in pos.json()["error"]["message"]
    bearer = await segment.client.post("/v1/track", json={"userId": "c", "event": "x"}, headers=segment.auth)
    assert bearer.status_code == 403  # a Bearer key is taken too, and this one is the POS's
    other = await segment.client.post(
        "/v1/track", json={"userId": "c", "event": "x"}, headers={"Authorization": "Digest x"}
    )
    assert other.status_code == 401 and other.headers["WWW-Authenticate"].startswith("Basic")
    missing = await segment.client.post("/v1/track", json={"userId": "c", "event": "x"})
    assert missing.status_code == 401 and "write key" in missing.json()["error"]["message"]
    assert await read_topic(segment.bootstrap, segment.topic, idle=0.5, timeout=2) == []


async def test_gzip_bodies_from_the_sdk_are_accepted(segment):
    errors: list[Any] = []
    client = sdk(segment.http_url, errors, gzip=True)
    for i in range(3):
        client.track(
            user_id=f"cust-{i}",
            event="Product Added",
            properties={"sku": f"s{i}", "price": 2.5, "quantity": 2},
            message_id=f"g-{i}",
        )
    await send(client)
    assert errors == []
    got = by_event_id(await read_topic(segment.bootstrap, segment.topic, min_count=3))
    assert sorted(got) == ["g-0", "g-1", "g-2"]
    assert got["g-1"]["type"] == "cart_updated"
    assert got["g-1"]["properties"] == {
        "items": [{"sku": "s1", "quantity": "2", "unit_price": "2.50"}],
        "total": "5.00",
    }


async def test_order_completed_without_order_id_is_a_rejection_with_its_reason(segment):
    errors: list[Any] = []
    client = sdk(segment.http_url, errors)
    client.track(
        user_id="cust-4",
        event="Order Completed",
        properties={"total": 10, "currency": "EUR", "products": [{"sku": "a", "price": 10, "quantity": 1}]},
        message_id="m-no-order",
    )
    client.track(user_id="cust-4", event="Signed Up", message_id="m-fine")
    await send(client)
    assert errors == []  # the batch was accepted: the SDK does not retry it
    got = await read_topic(segment.bootstrap, segment.topic, min_count=1, idle=1.0)
    assert [m["event_id"] for m in got] == ["m-fine"]
    [rejection] = await rejections(segment)
    assert (rejection["message_id"], rejection["type"], rejection["event"]) == (
        "m-no-order",
        "track",
        "Order Completed",
    )
    assert rejection["reasons"] == [
        {"field": "properties.order_id", "msg": "Field required", "loc": ["properties", "order_id"]}
    ]
    assert rejection["message"]["properties"]["total"] == 10 and "writeKey" not in rejection["message"]
    metrics = (await segment.client.get("/metrics")).text
    assert 'crm_ingest_segment_rejected_total{call="track",source="site"}' in metrics
    # Another source's key does not read them; ops (the pos test key has every scope) only by source.
    other = await segment.client.get("/v1/rejections?source=site", headers={"Authorization": f"Bearer {APP_KEY}"})
    assert other.status_code == 403
    assert await rejections(segment, source="app", key=APP_KEY) == []


async def test_rejections_are_paged_newest_first(segment):
    batch = [{"type": "track", "event": "Order Completed", "userId": "c", "messageId": f"r-{i}"} for i in range(5)]
    r = await segment.client.post("/v1/batch", json={"batch": batch}, headers=basic(WRITE_KEY))
    assert r.json() == {"success": True, "accepted": 0, "duplicates": 0, "rejected": 5}
    auth = {"Authorization": f"Bearer {WRITE_KEY}"}
    first = (await segment.client.get("/v1/rejections?source=site&limit=3", headers=auth)).json()
    assert [x["message_id"] for x in first["rejections"]] == ["r-4", "r-3", "r-2"]
    rest = (
        await segment.client.get(f"/v1/rejections?source=site&limit=3&before={first['next_before']}", headers=auth)
    ).json()
    assert [x["message_id"] for x in rest["rejections"]] == ["r-1", "r-0"] and rest["next_before"] is None


async def test_a_zip_bomb_is_413_and_bad_encodings_are_4xx(segment):
    bomb = gzip.compress(b'{"batch": [' + b" " * (20 << 20) + b"]}")
    assert len(bomb) < 100_000
    headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    r = await segment.client.post("/v1/batch", content=bomb, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["details"] == {"max_bytes": 500 << 10}
    assert "decompressed" in r.json()["error"]["message"]
    broken = await segment.client.post("/v1/batch", content=b"\x1f\x8bnot gzip", headers=headers)
    assert broken.status_code == 400
    truncated = await segment.client.post("/v1/batch", content=gzip.compress(b'{"batch": []}')[:-6], headers=headers)
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]["message"]
    brotli = await segment.client.post(
        "/v1/batch", content=b"{}", headers={**basic(WRITE_KEY), "Content-Encoding": "br"}
    )
    assert brotli.status_code == 415 and brotli.json()["error"]["details"]["supported"] == ["gzip", "identity"]


async def test_malformed_bodies_are_4xx_naming_the_problem(segment):
    headers = {**basic(WRITE_KEY), "Content-Type": "application/json"}
    not_json = await segment.client.post("/v1/batch", content=b"{nope", headers=headers)
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "malformed_json"
    a_list = await segment.client.post("/v1/track", content=b"[]", headers=headers)
    assert a_list.status_code == 400
    no_batch = await segment.client.post("/v1/batch", json={"events": []}, headers=headers)
    assert no_batch.status_code == 422 and no_batch.json()["error"]["details"][0]["loc"] == ["body", "batch"]


async def test_limits_name_themselves(segment):
    headers = basic(WRITE_KEY)
    big = "x" * (33 << 10)
    single = await segment.client.post("/v1/track", json={"userId": "c", "event": big}, headers=headers)
    assert single.status_code == 413 and "32768 bytes" in single.json()["error"]["message"]
    batch = {"batch": [{"type": "track", "userId": "c", "event": "E", "properties": {"x": big}}] * 16}
    whole = await segment.client.post("/v1/batch", json=batch, headers=headers)
    assert whole.status_code == 413 and "512000 bytes" in whole.json()["error"]["message"]
    mixed = {
        "batch": [
            {"type": "track", "userId": "c", "event": "E", "messageId": "big", "properties": {"x": big}},
            {"type": "track", "userId": "c", "event": "E", "messageId": "small"},
        ]
    }
    r = await segment.client.post("/v1/batch", json=mixed, headers=headers)
    assert r.status_code == 200 and r.json()["accepted"] == 1 and r.json()["rejected"] == 1
    [rejection] = await rejections(segment)
    assert rejection["message_id"] == "big" and "32 KB" in rejection["reasons"][0]["msg"]
    assert rejection["message"] is None
    many = {"batch": [{"type": "track", "userId": "c", "event": "E"}] * 1001}
    counted = await segment.client.post("/v1/batch", json=many, headers=headers)
    assert counted.status_code == 413 and counted.json()["error"]["details"]["max_events"] == 1000


async def test_write_key_in_the_body_is_accepted_and_never_kept(segment):
    r = await segment.client.post(
        "/v1/track",
        json={"writeKey": WRITE_KEY, "userId": "c", "event": "Order Completed", "messageId": "wk-1"},
    )
    assert r.status_code == 200 and r.json()["rejected"] == 1
    [rejection] = await rejections(segment)
    assert "writeKey" not in rejection["message"] and WRITE_KEY not in orjson.dumps(rejection).decode()
    wrong = await segment.client.post("/v1/track", json={"writeKey": "nope", "userId": "c", "event": "E"})
    assert wrong.status_code == 401


async def test_over_the_rate_limit_is_429_with_retry_after(segment):
    await segment.add_key("slow-site-key", source="site", scopes=["events:write"], rate=1)
    batch = {"batch": [{"type": "track", "userId": "c", "event": "E", "messageId": f"rl-{i}"} for i in range(5)]}
    first = await segment.client.post("/v1/batch", json=batch, headers=basic("slow-site-key"))
    assert first.status_code == 200 and first.json()["accepted"] == 5
    second = await segment.client.post("/v1/batch", json=batch, headers=basic("slow-site-key"))
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1


async def refusals(ingest: Any) -> float:
    """How many POSTs this process answered with 503 (the metric counts the whole test session)."""
    prefix = 'crm_http_requests_total{method="POST",service="ingest",status="503"}'
    lines = [m for m in (await ingest.client.get("/metrics")).text.splitlines() if m.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


async def test_the_sdk_waits_out_a_503_retry_after_and_its_batch_lands(segment, pg_server):
    import asyncpg

    primed = await segment.client.post("/v1/track", json={"userId": "c", "event": "E"}, headers=basic(WRITE_KEY))
    assert primed.status_code == 200
    db = segment.url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server.admin_url)
    errors: list[Any] = []
    client = sdk(segment.http_url, errors)
    try:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db)
        probe = {"batch": [{"type": "track", "userId": "c", "event": "E", "messageId": "m-probe"}]}
        refused = await segment.client.post("/v1/batch", json=probe, headers=basic(WRITE_KEY))
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        refused_before = await refusals(segment)
        client.track(user_id="cust-5", event="Signed Up", message_id="m-503")

        async def sdk_was_refused() -> bool:
            return await refusals(segment) > refused_before

        await eventually(sdk_was_refused, timeout=10, what="the SDK's upload refused with 503")
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()
    await send(client)  # the SDK re-queued the batch and sends it again after Retry-After
    assert errors == []
    got = await read_topic(segment.bootstrap, segment.topic, min_count=2)
    assert "m-503" in {m["event_id"] for m in got}
