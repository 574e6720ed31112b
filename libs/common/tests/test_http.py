"""crm_common.http: the path id type and the body reader, on a bare app with the JSON error handlers."""

from __future__ import annotations

import httpx
from fastapi import FastAPI, Request

from crm_common.errors import install_error_handlers
from crm_common.http import PathId, declared_over, read_limited_body


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/things/{thing_id}")
    async def post_thing(thing_id: PathId, request: Request) -> dict[str, int | str]:
        return {"id": thing_id, "size": len(await read_limited_body(request, 10))}

    return app


async def _post(path: str, content: bytes | list[bytes]) -> httpx.Response:
    async def chunks():
        for part in content:
            yield part

    body = content if isinstance(content, bytes) else chunks()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://test") as client:
        return await client.post(path, content=body)


async def test_a_body_up_to_the_limit_is_read_whole_and_one_byte_more_is_413_declared_or_streamed():
    ok = await _post("/things/t1", b"x" * 10)
    assert ok.status_code == 200 and ok.json() == {"id": "t1", "size": 10}
    for content in (b"x" * 11, [b"x" * 6, b"x" * 5]):
        r = await _post("/things/t1", content)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {
            "code": "payload_too_large",
            "message": "the request body exceeds the limit of 10 bytes",
            "details": {"max_bytes": 10},
        }


async def test_path_ids_with_nul_or_only_blanks_are_a_422_naming_the_parameter():
    for raw, msg in (("a%00", "NUL"), ("%20", "blank"), ("%09%20", "blank"), ("x" * 129, "at most 128")):
        r = await _post(f"/things/{raw}", b"")
        assert r.status_code == 422, (raw, r.text)
        detail = r.json()["error"]["details"][0]
        assert detail["loc"] == ["path", "thing_id"] and msg in detail["msg"], (raw, detail)
    assert (await _post("/things/%20a%20", b"")).json()["id"] == " a "


def test_a_content_length_that_is_not_a_number_announces_nothing():
    assert declared_over("11", 10) and declared_over(b"11", 10)
    assert not declared_over("10", 10) and not declared_over("-5", 10) and not declared_over("1e9", 10)
    assert not declared_over(None, 10)
