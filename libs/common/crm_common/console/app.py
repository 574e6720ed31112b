"""The console's ASGI app: the static pages and the `/api/<service>/...` proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, ORJSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from crm_common.errors import error_body
from crm_common.settings import SERVICE_PORTS, shared

STATIC = Path(__file__).parent / "static"
CONSOLE_PORT = 8000
# Request headers the proxy passes on; everything else (cookies, Host) stays with the console.
FORWARDED_REQUEST = ("authorization", "content-type", "accept", "idempotency-key")
FORWARDED_RESPONSE = ("content-type", "www-authenticate", "retry-after")
MAX_BODY = 2 << 20


class ConsoleSettings(BaseSettings):
    """Where the console listens and where the services are (CONSOLE_ prefix)."""

    model_config = SettingsConfigDict(env_prefix="CONSOLE_", extra="ignore", populate_by_name=True)

    port_offset: int = shared("CRM_PORT_OFFSET", 0)
    host: str = "127.0.0.1"
    # Base URLs by service; a service left out listens on 127.0.0.1 at its port plus the offset.
    service_urls: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 30.0

    def urls(self) -> dict[str, str]:
        defaults = {s: f"http://{self.host}:{p + self.port_offset}" for s, p in SERVICE_PORTS.items()}
        return {**defaults, **{k: v.rstrip("/") for k, v in self.service_urls.items() if k in SERVICE_PORTS}}


def create_app(settings: ConsoleSettings | None = None) -> FastAPI:
    """The console: `/` and `/static/*` are the pages, `/api/<service>/<path>` the proxy."""
    settings = settings or ConsoleSettings()
    urls = settings.urls()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.timeout_s) as client:
            app.state.client = client
            yield

    app = FastAPI(title="CRM console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        # One page: the hash names the view, so every link works without server-side routes.
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "services": urls}

    @app.api_route("/api/{service}/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(service: str, path: str, request: Request) -> Response:
        return await _forward(request, urls, service, path)

    return app


async def _forward(request: Request, urls: dict[str, str], service: str, path: str) -> Response:
    """Send the request on to the service; its answer comes back as it is (status, JSON, errors)."""
    if service not in urls:
        return ORJSONResponse(
            error_body("unknown_service", f"no service {service!r}", {"services": sorted(urls)}), status_code=404
        )
    if not path.startswith("v1/"):
        return ORJSONResponse(error_body("not_found", "the console forwards /v1 routes only"), status_code=404)
    body = await request.body()
    if len(body) > MAX_BODY:
        return ORJSONResponse(error_body("payload_too_large", "request body too large"), status_code=413)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST}
    client: httpx.AsyncClient = request.app.state.client
    try:
        answer = await client.request(
            request.method,
            f"{urls[service]}/{path}",
            params=list(request.query_params.multi_items()),
            content=body or None,
            headers=headers,
        )
    except httpx.HTTPError as exc:
        return ORJSONResponse(
            error_body("service_unavailable", f"{service} did not answer: {type(exc).__name__}"),
            status_code=502,
        )
    out = {k: v for k, v in answer.headers.items() if k.lower() in FORWARDED_RESPONSE}
    return Response(content=answer.content, status_code=answer.status_code, headers=out)
