"""HTTP routes of the Segment tracking API (`POST /v1/track`, `/identify`, `/page`, `/screen`,
`/alias`, `/group`, `/batch`) and of the messages they could not accept (`GET /v1/rejections`)."""

from __future__ import annotations

import base64
import binascii
import zlib
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from crm_common.auth import parse_bearer
from crm_common.contract.events import Source
from crm_common.errors import CRMError, Forbidden, Unauthorized
from crm_common.service import ServiceRuntime
from ingest.api import read_body
from ingest.deps import (
    EventsReader,
    KeyCacheDep,
    RateLimiterDep,
    RuntimeDep,
    SettingsDep,
    authorize,
    rate_of,
    transaction,
)
from ingest.errors import BodyTooLarge, InvalidEvent, MalformedBody, TooManyRequests
from ingest.keys import KeyCache, Principal
from ingest.ratelimit import RateLimiter
from ingest.repository import RejectionRepository
from ingest.segment import CALLS, ingest_segment
from ingest.settings import Settings

router = APIRouter()

CHALLENGE = 'Basic realm="crm-ingest"'
SEGMENT_SOURCES = ("site", "app")
_ERROR = {"description": 'JSON error: {"error": {"code", "message", "details"}}'}
_RESPONSES: dict[int | str, dict[str, Any]] = {code: _ERROR for code in (400, 401, 403, 413, 415, 422, 429, 503)}


class UnsupportedEncoding(CRMError):
    status_code = 415
    code = "unsupported_encoding"


class SegmentAccepted(BaseModel):
    success: bool
    accepted: int
    duplicates: int
    rejected: int


class RejectionRead(BaseModel):
    id: int
    source: str
    api: str
    message_id: str | None
    type: str | None
    event: str | None
    reasons: list[dict[str, Any]]
    message: Any
    received_at: datetime


class RejectionPage(BaseModel):
    rejections: list[RejectionRead]
    next_before: int | None


def basic_user(header: str) -> str | None:
    """The user name of `Authorization: Basic base64(user:password)`, or None."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = decoded.partition(":")[0].strip()
    return user or None


def gunzip(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, never holding more than `limit` + 1 bytes of output."""
    too_large = f"the decompressed request body exceeds the limit of {limit} bytes"
    out = bytearray()
    rest = body
    while rest:
        # One member at a time: a gzip stream may hold several, one after the other.
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += decompressor.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise MalformedBody(f"the body is not valid gzip: {exc}") from None
        if len(out) > limit:
            raise BodyTooLarge(too_large, details={"max_bytes": limit})
        if not decompressor.eof:
            raise MalformedBody("the gzip body is truncated")
        rest = decompressor.unused_data
    return bytes(out)


def decoded_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    coding = (encoding or "").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    raise UnsupportedEncoding(
        f"Content-Encoding {encoding!r} is not supported", details={"supported": ["gzip", "identity"]}
    )


async def _writer(
    key: str, *, runtime: ServiceRuntime, settings: Settings, cache: KeyCache, limiter: RateLimiter
) -> Principal:
    principal = await authorize(
        key, "events:write", runtime=runtime, settings=settings, cache=cache, limiter=limiter, challenge=CHALLENGE
    )
    if principal.source not in SEGMENT_SOURCES:
        raise Forbidden(
            f"a Segment write key must be an API key of source site or app; this one is {principal.source}",
            details={"source": principal.source},
        )
    return principal


async def _accept(
    request: Request,
    call: str | None,
    runtime: ServiceRuntime,
    settings: Settings,
    cache: KeyCache,
    limiter: RateLimiter,
) -> Response:
    """Authenticate, read and decode the body, accept its messages; 200 `{"success": true}`."""
    header = request.headers.get("authorization")
    principal = None
    if header is not None:
        # The SDKs send Basic; a Bearer key is what every other ingest route takes.
        key = basic_user(header) or parse_bearer(header)
        if key is None:
            raise Unauthorized(
                "send the write key as the Basic-auth user name: 'Authorization: Basic base64(<write key>:)'",
                headers={"WWW-Authenticate": CHALLENGE},
            )
        principal = await _writer(key, runtime=runtime, settings=settings, cache=cache, limiter=limiter)
    limit = settings.segment_max_batch_bytes if call is None else settings.segment_max_message_bytes
    body = decoded_body(await read_body(request, limit), request.headers.get("content-encoding"), limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedBody("the body must be a JSON object", details=[{"loc": ["body"], "msg": "must be an object"}])
    # The key is a secret: it must not reach the rejections table with a message.
    body_key = data.pop("writeKey", None)
    if principal is None:
        if not isinstance(body_key, str) or not body_key.strip():
            raise Unauthorized(
                "missing write key: send it as the Basic-auth user name (or as 'writeKey' in the body)",
                headers={"WWW-Authenticate": CHALLENGE},
            )
        principal = await _writer(body_key.strip(), runtime=runtime, settings=settings, cache=cache, limiter=limiter)
    if call is None:
        messages = data.get("batch")
        if not isinstance(messages, list):
            raise InvalidEvent(
                'a batch body is {"batch": [...]}', details=[{"loc": ["body", "batch"], "msg": "must be an array"}]
            )
        if len(messages) > settings.max_batch_events:
            raise BodyTooLarge(
                f"a batch holds at most {settings.max_batch_events} messages; this one has {len(messages)}",
                details={"max_events": settings.max_batch_events, "events": len(messages)},
            )
        for message in messages:
            if isinstance(message, dict):
                message.pop("writeKey", None)
    else:
        messages = [data]
    wait = limiter.retry_after(principal.key_id, rate_of(principal, settings), cost=max(1, len(messages)))
    if wait is not None:
        raise TooManyRequests("rate limit of this API key exceeded", headers={"Retry-After": str(wait)})
    async with transaction(runtime) as session:
        outcome = await ingest_segment(
            session=session,
            source=principal.source,
            messages=messages,
            call=call,
            batch_sent_at=data.get("sentAt") if call is None else None,
            batch_context=data.get("context") if call is None else None,
            max_message_bytes=settings.segment_max_message_bytes,
            now=runtime.clock.now(),
        )
    if outcome.accepted:
        runtime.wake_relays()
    return Response(orjson.dumps(outcome.as_dict()), status_code=200, media_type="application/json")


def _route(call: str | None) -> None:
    path = f"/v1/{call or 'batch'}"
    summary = (
        'Segment batch: `{"batch": [...]}` of up to 1,000 messages and 500 KB'
        if call is None
        else f"Segment {call} call (one message of up to 32 KB)"
    )

    async def endpoint(
        request: Request, runtime: RuntimeDep, settings: SettingsDep, cache: KeyCacheDep, limiter: RateLimiterDep
    ) -> Response:
        return await _accept(request, call, runtime, settings, cache, limiter)

    endpoint.__name__ = f"segment_{call or 'batch'}"
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        tags=["segment"],
        summary=summary,
        description="Auth: the write key (an ingest key of source site or app with `events:write`) as the "
        "Basic-auth user name (or `Authorization: Bearer <key>`, or `writeKey` in the body). Messages that "
        "fail mapping or validation are kept in `GET /v1/rejections`.",
        response_model=SegmentAccepted,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
        },
        responses=_RESPONSES,
    )


for _call in (*CALLS, None):
    _route(_call)


@router.get(
    "/v1/rejections",
    tags=["segment"],
    summary="Messages of accepted Segment requests that were rejected, newest first, with their reasons",
    response_model=RejectionPage,
    responses={401: _ERROR, 403: _ERROR},
)
async def list_rejections(
    principal: EventsReader,
    runtime: RuntimeDep,
    source: Source,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="page on: the `next_before` of the last page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    if principal.source not in (source, "ops"):
        raise Forbidden(f"a {principal.source} key reads only {principal.source} rejections")
    async with transaction(runtime) as session:
        rows = await RejectionRepository(session).list_recent(source=source, before=before, limit=limit)
    return {
        "rejections": [
            {
                "id": r.id,
                "source": r.source,
                "api": r.api,
                "message_id": r.message_id,
                "type": r.type,
                "event": r.event,
                "reasons": orjson.loads(r.reasons),
                "message": orjson.loads(r.payload) if r.payload is not None else None,
                "received_at": r.received_at,
            }
            for r in rows
        ],
        "next_before": rows[-1].id if len(rows) == limit else None,
    }
