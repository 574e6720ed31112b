"""Accepting events: parse the body, validate each event once, archive the new ones in one insert."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import validate_event
from ingest.errors import BodyTooLarge, InvalidEvent, MalformedBody
from ingest.repository import EventRepository, EventRow

_ENVELOPE = frozenset({"event_id", "type", "customer_id", "anonymous_id", "occurred_at", "store_id", "properties"})


@dataclass(slots=True)
class ParsedBody:
    events: list[Any]
    is_batch: bool


def parse_body(body: bytes, *, max_events: int) -> ParsedBody:
    """Decode one event or `{"events": [...]}`; enforce the event-count limit."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "events" in data:
        events = data["events"]
        if set(data) != {"events"}:
            raise InvalidEvent(
                "a batch body has only the key 'events'",
                details=[{"loc": ["body", k], "msg": "extra key not allowed"} for k in data if k != "events"],
            )
        if not isinstance(events, list):
            raise InvalidEvent(
                "'events' must be a list", details=[{"loc": ["body", "events"], "msg": "must be a list"}]
            )
        if not events:
            raise InvalidEvent("'events' is empty", details=[{"loc": ["body", "events"], "msg": "at least 1 event"}])
        if len(events) > max_events:
            raise BodyTooLarge(
                f"a batch holds at most {max_events} events; this one has {len(events)}",
                details={"max_events": max_events, "events": len(events)},
            )
        return ParsedBody(events, True)
    if isinstance(data, dict):
        return ParsedBody([data], False)
    raise InvalidEvent(
        'the body must be an event object or {"events": [...]}',
        details=[{"loc": ["body"], "msg": "must be a JSON object"}],
    )


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """loc/msg per failing field; properties errors get the `properties` prefix they lack."""
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = list(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            # Rules of the envelope validator carry no location; their message names the field.
            head = msg.split(" ", 1)[0]
            loc = [head] if head in _ENVELOPE else ["properties"]
        elif loc[0] not in _ENVELOPE:
            # The per-type properties model is validated inside the envelope's validator.
            loc = ["properties", *loc]
        out.append({"loc": loc, "msg": msg})
    return out


_NUMERIC = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
NUMERIC_TIME_ERROR: dict[str, Any] = {
    "loc": ["occurred_at"],
    "msg": "must be an RFC 3339 timestamp with an offset, such as 2026-01-05T11:58:00+01:00, not a number",
}


def _numeric_time(value: Any) -> bool:
    """A number, or a string of one: the model would take it as Unix seconds (or milliseconds,
    when large) in UTC, but the contract asks for RFC 3339 with an explicit offset, as it does of
    strings (a timestamp without an offset is refused)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and _NUMERIC.match(value) is not None)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__
    )


@dataclass(slots=True)
class IngestOutcome:
    accepted: int
    duplicates: int
    rejected: int
    results: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "results": self.results,
        }


async def ingest_events(*, session: AsyncSession, source: str, events: list[Any], now: datetime) -> IngestOutcome:
    """Validate each event, archive and queue the new ones with one statement, report per event."""
    results: list[dict[str, Any]] = []
    rows: list[EventRow] = []
    row_index: dict[str, int] = {}
    rejected = 0
    for index, data in enumerate(events):
        if not isinstance(data, dict):
            errors: list[dict[str, Any]] = [
                {"loc": [], "msg": f"an event must be a JSON object, not {_json_type(data)}"}
            ]
            results.append({"index": index, "event_id": None, "status": "rejected", "errors": errors})
            rejected += 1
            continue
        raw_id = data.get("event_id")
        event_id = raw_id if isinstance(raw_id, str) else None
        errors = []
        try:
            event = validate_event(data, source=source, now=now)
        except ValidationError as exc:
            errors = _field_errors(exc)
        if _numeric_time(data.get("occurred_at")):
            errors = [e for e in errors if e["loc"][:1] != ["occurred_at"]] + [NUMERIC_TIME_ERROR]
        if errors:
            results.append({"index": index, "event_id": event_id, "status": "rejected", "errors": errors})
            rejected += 1
            continue
        event_id = event.event_id
        if event_id in row_index:
            # The same event twice in one batch: the first one counts, like a resend.
            results.append({"index": index, "event_id": event_id, "status": "duplicate", "errors": []})
            continue
        row_index[event_id] = index
        results.append({"index": index, "event_id": event_id, "status": "accepted", "errors": []})
        message = {
            "id": f"{source}:{event_id}",
            "source": source,
            "event_id": event_id,
            "type": event.type,
            "customer_id": event.customer_id,
            "anonymous_id": event.anonymous_id,
            "occurred_at": event.occurred_at,
            "received_at": now,
            "store_id": event.store_id,
            "properties": event.properties,
        }
        rows.append(
            EventRow(
                event_id=event_id,
                customer_key=event.customer_id or f"anon:{event.anonymous_id}",
                type=event.type,
                occurred_at=event.occurred_at,
                message=orjson.dumps(message),
            )
        )
    new_ids = await EventRepository(session).insert_new(source=source, received_at=now, rows=rows)
    duplicates = 0
    for r in results:
        if r["status"] == "duplicate" or (r["status"] == "accepted" and r["event_id"] not in new_ids):
            r["status"] = "duplicate"
            duplicates += 1
    return IngestOutcome(len(results) - duplicates - rejected, duplicates, rejected, results)
