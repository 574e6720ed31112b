"""The ops API key on the /v1 routes of `create_service_app`: CRM_API_KEYS, bearer, open probes."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from crm_common.auth import ApiKeys
from crm_common.service import create_service_app
from crm_common.settings import BaseServiceSettings
from crm_common.testing.helpers import TEST_API_KEY, run_app, stack_settings

things = APIRouter(prefix="/v1", tags=["things"])
callbacks = APIRouter(prefix="/v1", tags=["callbacks"])


@things.get("/things/{thing_id}")
async def read_thing(thing_id: str) -> dict[str, str]:
    return {"id": thing_id}


@things.post("/things")
async def create_thing(body: dict[str, Any]) -> dict[str, Any]:
    return body


@things.get("/contacts/{contact_id}")
async def read_contact(contact_id: str) -> dict[str, Any]:
    return {
        "id": contact_id,
        "email": "john.doe@example.com",
        "phone": "+447700900123",
        "traits": {"mobile_phone": "07700 900123", "note": "wrote from ann@shop.example", "app": "ios"},
        "consents": {"email": True, "sms": False},
        "channel": "email",
        "orders": [1, 2],
    }


@callbacks.post("/callbacks/{provider}")
async def callback(provider: str) -> dict[str, str]:
    return {"provider": provider}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def start(make_database, broker) -> Callable[..., Any]:
    """`async with start(api_keys=..., headers=...) as client`: a service app with the test routers."""

    @asynccontextmanager
    async def _start(
        *, headers: dict[str, str] | None = None, require_api_key: bool = True, **settings: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        url = await make_database()
        s = stack_settings(
            BaseServiceSettings, database_url=url, bootstrap=broker.bootstrap, service_name="authtest", **settings
        )
        app = create_service_app(
            settings=s,
            title="auth test",
            description="",
            routers=[things],
            public_routers=[callbacks],
            require_api_key=require_api_key,
        )
        async with run_app(app, headers=headers if headers is not None else {}) as client:
            yield client

    return _start


def assert_unauthorized(r: httpx.Response, message: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "unauthorized"
    assert message in error["message"]
    assert set(error) == {"code", "message", "details"}


async def test_a_v1_route_without_a_key_is_401_with_a_bearer_challenge(start):
    async with start(api_keys="k-one") as client:
        assert_unauthorized(await client.get("/v1/things/a"), "missing API key")
        assert_unauthorized(await client.post("/v1/things", json={"points": 10**12}), "missing API key")
        assert_unauthorized(await client.get("/v1/things/a", headers={"Authorization": "Bearer   "}), "missing API key")
        assert_unauthorized(
            await client.get("/v1/things/a", headers={"Authorization": "Basic k-one"}), "missing API key"
        )
        assert_unauthorized(await client.get("/v1/ops/pipeline"), "missing API key")
        assert_unauthorized(await client.post("/v1/ops/sweeps/anything"), "missing API key")


async def test_a_wrong_key_is_401(start):
    async with start(api_keys="k-one,k-two") as client:
        for key in ("k-three", "k-one,k-two", "K-ONE", "k-on"):
            assert_unauthorized(await client.get("/v1/things/a", headers=bearer(key)), "unknown API key")


async def test_any_configured_key_is_accepted(start):
    async with start(api_keys=" k-one , k-two,") as client:
        for key in ("k-one", "k-two"):
            r = await client.get("/v1/things/a", headers=bearer(key))
            assert r.status_code == 200, r.text
            assert r.json() == {"id": "a"}
        r = await client.post("/v1/things", json={"x": 1}, headers={"authorization": "bearer k-two"})
        assert r.status_code == 200 and r.json() == {"x": 1}
        pipeline = await client.get("/v1/ops/pipeline", headers=bearer("k-one"))
        assert pipeline.status_code == 200 and pipeline.json()["consumers"] == []
        sweep = await client.post("/v1/ops/sweeps/nothing", headers=bearer("k-one"))
        assert sweep.status_code == 404


async def test_a_key_can_be_configured_by_its_sha256_digest(start):
    digest = hashlib.sha256(b"only-the-digest-is-configured").hexdigest()
    async with start(api_keys=f"sha256:{digest.upper()},plain-key") as client:
        assert (await client.get("/v1/things/a", headers=bearer("only-the-digest-is-configured"))).status_code == 200
        assert (await client.get("/v1/things/a", headers=bearer("plain-key"))).status_code == 200
        # The digest itself is not a key.
        assert_unauthorized(await client.get("/v1/things/a", headers=bearer(digest)), "unknown API key")
        assert_unauthorized(await client.get("/v1/things/a", headers=bearer(f"sha256:{digest}")), "unknown API key")


async def test_health_metrics_and_docs_are_open(start):
    async with start(api_keys="k-one") as client:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            r = await client.get(path)
            assert r.status_code == 200, (path, r.text)


async def test_public_routers_are_open_and_a_protected_route_of_the_same_app_is_not(start):
    async with start(api_keys="k-one") as client:
        r = await client.post("/v1/callbacks/sms")
        assert r.status_code == 200 and r.json() == {"provider": "sms"}
        assert_unauthorized(await client.get("/v1/ops/pipeline"), "missing API key")


async def test_without_configured_keys_every_protected_route_is_401_saying_to_set_them(start, capsys):
    async with start(api_keys="") as client:
        for r in (
            await client.get("/v1/things/a"),
            await client.get("/v1/things/a", headers=bearer("anything")),
            await client.get("/v1/ops/pipeline", headers=bearer("")),
        ):
            assert_unauthorized(r, "set CRM_API_KEYS")
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.post("/v1/callbacks/sms")).status_code == 200
    # The service's logging setup writes to stderr.
    assert "WARNING crm_common.service no API keys configured" in capsys.readouterr().err


async def test_the_harness_configures_its_test_key_and_clients_send_it_by_default(make_database, broker):
    settings = BaseServiceSettings(
        database_url=await make_database(),
        kafka_bootstrap_servers=broker.bootstrap,
        consumers_enabled=False,
        log_json=False,
    )
    assert ApiKeys(settings.api_keys.get_secret_value()).matches(TEST_API_KEY)
    app = create_service_app(settings=settings, title="t", description="", routers=[things])
    async with run_app(app) as client:
        assert (await client.get("/v1/things/a")).status_code == 200
    async with run_app(app, headers={}) as client:
        assert (await client.get("/v1/things/a")).status_code == 401


async def test_a_service_with_its_own_key_check_can_opt_out(start):
    async with start(api_keys="", require_api_key=False) as client:
        assert (await client.get("/v1/things/a")).status_code == 200
        assert (await client.get("/v1/ops/pipeline")).status_code == 200


async def test_openapi_declares_the_bearer_scheme_on_the_protected_operations_only(start):
    async with start(api_keys="k-one") as client:
        doc = (await client.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an ops API key, one of CRM_API_KEYS: `Authorization: Bearer <key>`; a key without the "
        "`write` scope may only GET, one without `pii` sees e-mail addresses and phone numbers masked",
    }
    paths = doc["paths"]
    for path, method in (("/v1/things/{thing_id}", "get"), ("/v1/things", "post"), ("/v1/ops/pipeline", "get")):
        assert paths[path][method]["security"] == [{"ApiKey": []}], path
        assert "401" in paths[path][method]["responses"]
    for path, method in (("/v1/callbacks/{provider}", "post"), ("/healthz", "get"), ("/readyz", "get")):
        assert "security" not in paths[path][method], path


def test_a_malformed_digest_entry_is_refused_at_startup():
    for spec in ("sha256:xyz", "sha256:" + "ab" * 31, "sha256:"):
        with pytest.raises(ValueError, match="64 hex digits"):
            ApiKeys(spec)
    assert not ApiKeys(" , ,")
    assert len(ApiKeys("a,b,sha256:" + "00" * 32)) == 3


def test_scopes_follow_the_key_after_a_colon_and_a_bare_key_has_them_all():
    digest = hashlib.sha256(b"digest-key").hexdigest()
    keys = ApiKeys(f"all,reader:read,pii-reader:read+pii,writer:write,sha256:{digest}:read+write, spaced : PII ")
    assert keys.scopes("all") == {"read", "write", "pii"}
    assert keys.scopes("reader") == {"read"}
    assert keys.scopes("pii-reader") == {"read", "pii"}
    assert keys.scopes("writer") == {"read", "write"}  # every key reads
    assert keys.scopes("digest-key") == {"read", "write"}
    assert keys.scopes("spaced") == {"read", "pii"}
    assert keys.scopes("reader:read") is None and keys.scopes(digest) is None
    assert len(keys) == 6


def test_an_unknown_scope_is_refused_at_startup():
    for spec in ("k:admin", "k:read+", "k:", "sha256:" + "00" * 32 + ":everything"):
        with pytest.raises(ValueError, match="scope"):
            ApiKeys(spec)


async def test_a_key_without_write_may_read_but_changes_nothing(start):
    async with start(api_keys="k-all,k-read:read,k-write:read+write") as client:
        assert (await client.get("/v1/things/a", headers=bearer("k-read"))).status_code == 200
        assert (await client.head("/v1/things/a", headers=bearer("k-read"))).status_code in (200, 405)
        for method, path in (("POST", "/v1/things"), ("POST", "/v1/ops/sweeps/retention")):
            r = await client.request(method, path, json={"x": 1}, headers=bearer("k-read"))
            assert r.status_code == 403, r.text
            assert r.json()["error"] == {
                "code": "missing_scope",
                "message": f"this API key may not change anything: {method} needs the 'write' scope",
                "details": {"required_scope": "write", "scopes": ["read"]},
            }
        for key in ("k-all", "k-write"):
            r = await client.post("/v1/things", json={"x": 1}, headers=bearer(key))
            assert r.status_code == 200 and r.json() == {"x": 1}


async def test_contact_data_is_masked_for_a_key_without_pii(start):
    async with start(api_keys="k-all,k-read:read,k-pii:read+pii") as client:
        whole = (await client.get("/v1/contacts/c1", headers=bearer("k-pii"))).json()
        assert whole == (await client.get("/v1/contacts/c1", headers=bearer("k-all"))).json()
        assert whole["email"] == "john.doe@example.com" and whole["phone"] == "+447700900123"
        r = await client.get("/v1/contacts/c1", headers=bearer("k-read"))
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
        masked = r.json()
        assert masked["email"] == "j***@example.com"
        assert masked["phone"] == "+44********23"
        assert masked["traits"] == {
            "mobile_phone": "07*** ****23",
            "note": "wrote from a***@shop.example",
            "app": "ios",
        }
        # What is not contact data is left alone.
        for key in ("id", "consents", "channel", "orders"):
            assert masked[key] == whole[key], key
        # Errors and other answers too: nothing breaks on a non-contact body.
        assert (await client.get("/v1/ops/pipeline", headers=bearer("k-read"))).json()["consumers"] == []
