"""Topic handlers: contact data from crm.events.v1, message requests from crm.messages.v1."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.consumer import PoisonMessage, Record
from crm_common.contract.events import CustomerUpdatedProps, EventMessage
from crm_common.contract.messages import MessageRequested
from crm_common.contract.types import check_free_json
from crm_common.settings import TOPIC_MESSAGES
from notifier.contacts import apply_customer_updates
from notifier.messages import accept_requests
from notifier.policy import Policy
from notifier.repository import NotifierRepository
from notifier.schemas import storable_time

MAX_ID = 128


def after_commit(session: AsyncSession, fn: Callable[[], None]) -> None:
    """Call `fn` once the session's transaction commits (not if it rolls back)."""
    event.listen(session.sync_session, "after_commit", lambda _s: fn(), once=True)


def parse_request(rec: Record) -> MessageRequested:
    try:
        req = MessageRequested.model_validate(rec.value)
        check_free_json(req.variables)
    except (ValidationError, ValueError) as exc:
        raise PoisonMessage(f"invalid message request: {exc}") from None
    for name in ("id", "customer_id", "template", "campaign_id", "offer_id"):
        value = getattr(req, name)
        if value is not None and (not value or len(value) > MAX_ID or "\x00" in value):
            raise PoisonMessage(f"invalid message request: {name} must be 1-{MAX_ID} characters without NUL")
    for name in ("not_before", "expires_at"):
        value = getattr(req, name)
        if value is not None and value.tzinfo is not None and not storable_time(value):
            raise PoisonMessage(f"invalid message request: {name} must fall within years 1-9999 in UTC")
    return req


def parse_contact_update(rec: Record) -> tuple[str, CustomerUpdatedProps, datetime] | None:
    if rec.value.get("type") != "customer_updated" or not rec.value.get("customer_id"):
        return None
    try:
        ev = EventMessage.model_validate(rec.value)
        props = CustomerUpdatedProps.model_validate(ev.properties)
    except ValidationError as exc:
        raise PoisonMessage(f"invalid customer_updated: {exc}") from None
    if ev.customer_id is None or len(ev.customer_id) > MAX_ID:
        raise PoisonMessage("customer_id must be at most 128 characters")
    return ev.customer_id, props, ev.occurred_at


def make_handler(*, policy: Policy, clock: Clock, wake: Callable[[], None]):  # type: ignore[no-untyped-def]
    """One handler for both topics: contact changes of the batch apply before its requests."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        updates = []
        requests = []
        for rec in records:
            if rec.topic.endswith(TOPIC_MESSAGES):
                requests.append(parse_request(rec))
            else:
                parsed = parse_contact_update(rec)
                if parsed is not None:
                    updates.append(parsed)
        await apply_customer_updates(repo=NotifierRepository(session), updates=updates)
        due = await accept_requests(session=session, requests=requests, now=clock.now(), policy=policy)
        if due:
            after_commit(session, wake)

    return handle
