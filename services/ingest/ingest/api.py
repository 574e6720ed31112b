"""HTTP routes of ingest: events in, archived event lookup, replay, API key management."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from crm_common.contract.events import EventMessage, Source
from crm_common.errors import Forbidden, NotFound
from crm_common.http import PathId, read_limited_body
from ingest.deps import (
    EventsReader,
    EventsWriter,
    KeyCacheDep,
    KeysAdmin,
    RateLimiterDep,
    Replayer,
    RuntimeDep,
    SettingsDep,
    one_statement,
    rate_of,
    transaction,
)
from ingest.errors import BodyTooLarge, TooManyRequests
from ingest.events import ingest_events, parse_body
from ingest.keys import create_key, revoke_key
from ingest.repository import EventRepository, KeyRepository
from ingest.retention import check_replay_reach
from ingest.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    ArchivedEventRead,
    IngestResponse,
    ReplayIn,
    ReplayRead,
)

router = APIRouter()

_ERROR = {"description": 'JSON error: {"error": {"code", "message", "details"}}'}
EVENTS_BODY_SCHEMA = {
    "oneOf": [{"$ref": "#/components/schemas/EventIn"}, {"$ref": "#/components/schemas/EventBatchIn"}]
}


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than `limit` bytes (CONTRACT.md: 1 MiB) with ingest's own message."""
    size = f"1 MiB ({limit} bytes)" if limit == 1 << 20 else f"{limit} bytes"
    return await read_limited_body(
        request,
        limit,
        error_factory=lambda _: BodyTooLarge(
            f"the request body exceeds the limit of {size}", details={"max_bytes": limit}
        ),
    )


@router.post(
    "/v1/events",
    tags=["events"],
    summary="Post one event or a batch of up to 1,000 events",
    status_code=202,
    response_model=IngestResponse,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": EVENTS_BODY_SCHEMA}}}},
    responses={
        400: _ERROR,
        401: _ERROR,
        403: _ERROR,
        413: _ERROR,
        422: _ERROR,
        429: _ERROR,
        503: _ERROR,
    },
)
async def post_events(
    request: Request,
    principal: EventsWriter,
    runtime: RuntimeDep,
    settings: SettingsDep,
    limiter: RateLimiterDep,
) -> Response:
    """202 once the accepted events are durably archived; each event is reported in order."""
    parsed = parse_body(await read_body(request, settings.max_body_bytes), max_events=settings.max_batch_events)
    wait = limiter.retry_after(principal.key_id, rate_of(principal, settings), cost=len(parsed.events))
    if wait is not None:
        raise TooManyRequests("rate limit of this API key exceeded", headers={"Retry-After": str(wait)})
    # One statement archives and queues the whole batch (EventRepository.insert_new).
    async with one_statement(runtime) as session:
        outcome = await ingest_events(
            session=session, source=principal.source, events=parsed.events, now=runtime.clock.now()
        )
    if outcome.accepted:
        runtime.wake_relays()
    body: dict[str, Any] = outcome.as_dict()
    if not parsed.is_batch and outcome.rejected:
        details = outcome.results[0]["errors"]
        body["error"] = {"code": "validation_error", "message": "the event is invalid", "details": details}
        return Response(orjson.dumps(body), status_code=422, media_type="application/json")
    return Response(orjson.dumps(body), status_code=202, media_type="application/json")


@router.get(
    "/v1/events/{source}/{event_id:path}",
    tags=["events"],
    summary="Show one archived event",
    response_model=ArchivedEventRead,
    responses={401: _ERROR, 403: _ERROR, 404: _ERROR},
)
async def get_event(source: Source, event_id: PathId, principal: EventsReader, runtime: RuntimeDep) -> dict[str, Any]:
    if principal.source not in (source, "ops"):
        raise Forbidden(f"a {principal.source} key reads only {principal.source} events")
    async with transaction(runtime) as session:
        found = await EventRepository(session).get(source=source, event_id=event_id)
    if found is None:
        raise NotFound(f"no archived event {event_id!r} from {source}")
    event, pending = found
    return {
        "seq": event.seq,
        "source": event.source,
        "event_id": event.event_id,
        "type": event.type,
        "received_at": event.received_at,
        "pending": pending,
        "message": EventMessage.model_validate_json(event.message),
    }


@router.post(
    "/v1/replay",
    tags=["events"],
    summary="Publish archived events of a time range again (consumers dedupe by message id)",
    status_code=202,
    response_model=ReplayRead,
    responses={401: _ERROR, 403: _ERROR, 422: _ERROR, 503: _ERROR},
)
async def replay(
    replay_in: ReplayIn, principal: Replayer, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    """422 when `from` is older than the archive keeps or the consumers' inboxes remember."""
    check_replay_reach(start=replay_in.from_, by=replay_in.by, settings=settings, now=runtime.clock.now())
    async with transaction(runtime) as session:
        count = await EventRepository(session).queue_range(
            by=replay_in.by, start=replay_in.from_, end=replay_in.to, types=replay_in.types
        )
    runtime.wake_relays()
    return {
        "replayed": count,
        "from_": replay_in.from_,
        "to": replay_in.to,
        "types": replay_in.types,
        "by": replay_in.by,
    }


@router.post(
    "/v1/keys",
    tags=["keys"],
    summary="Create an API key (the secret is shown only in this answer)",
    status_code=201,
    response_model=ApiKeyCreated,
    responses={401: _ERROR, 403: _ERROR},
)
async def post_key(key_in: ApiKeyCreate, principal: KeysAdmin, runtime: RuntimeDep) -> dict[str, Any]:
    async with transaction(runtime) as session:
        key, secret = await create_key(session=session, key_in=key_in)
        await session.refresh(key)
    return {**ApiKeyRead.model_validate(key).model_dump(), "key": secret}


@router.get("/v1/keys", tags=["keys"], summary="List API keys (never their secrets)", response_model=list[ApiKeyRead])
async def list_keys(principal: KeysAdmin, runtime: RuntimeDep) -> list[ApiKeyRead]:
    async with transaction(runtime) as session:
        keys = await KeyRepository(session).list_all()
        return [ApiKeyRead.model_validate(k) for k in keys]


@router.delete(
    "/v1/keys/{key_id}",
    tags=["keys"],
    summary="Revoke an API key",
    response_model=ApiKeyRead,
    responses={401: _ERROR, 403: _ERROR, 404: _ERROR},
)
async def delete_key(key_id: uuid.UUID, principal: KeysAdmin, runtime: RuntimeDep, cache: KeyCacheDep) -> ApiKeyRead:
    async with transaction(runtime) as session:
        key = await revoke_key(session=session, cache=cache, key_id=key_id, now=runtime.clock.now())
        if key is None:
            raise NotFound(f"no API key {key_id}")
        return ApiKeyRead.model_validate(key)
