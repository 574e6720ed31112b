"""Topic handlers: message in, domain call, nothing clever (the runtime commits and dedupes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.clock import Clock
from crm_common.consumer import PoisonMessage, Record
from crm_common.contract.events import EventMessage
from crm_common.contract.messages import MessageRequested, SegmentMembershipChanged
from loyalty import goals, point_offers
from loyalty.accrual import UnusableEvent, apply_events
from loyalty.ledger import Book, load_programme

Handler = Callable[[AsyncSession, list[Record]], Awaitable[None]]


def events_handler(clock: Clock, *, publish_accruals: bool = True) -> Handler:
    """crm.events.v1: accounts, accruals, reversals, referral links, birthdays."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        try:
            events = [EventMessage.model_validate(r.value) for r in records]
        except ValidationError as exc:
            raise PoisonMessage(f"not an event message: {exc.errors()[:3]}") from exc
        programme = await load_programme(session)
        try:
            await apply_events(
                session=session,
                events=events,
                programme=programme,
                now=clock.now(),
                publish_accruals=publish_accruals,
            )
        except UnusableEvent as exc:
            raise PoisonMessage(str(exc)) from exc

    return handle


def segments_handler(clock: Clock) -> Handler:
    """crm.segments.v1: entry into a goal segment assigns a personal goal."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        programme = await load_programme(session)
        if programme.goals is None:
            return
        book = Book(session, programme, clock.now())
        for r in records:
            try:
                msg = SegmentMembershipChanged.model_validate(r.value)
            except ValidationError as exc:
                raise PoisonMessage(f"not a segment message: {exc.errors()[:3]}") from exc
            if msg.type == "segment.entered":
                await goals.assign(
                    book=book,
                    programme=programme,
                    customer_id=msg.customer_id,
                    segment_key=msg.segment_key,
                    cause_id=msg.id,
                    at=msg.occurred_at,
                )
        await book.flush()

    return handle


def messages_handler(clock: Clock) -> Handler:
    """crm.messages.v1: of the message requests, only offers' points-multiplier offers matter here."""

    async def handle(session: AsyncSession, records: list[Record]) -> None:
        wanted = [r for r in records if isinstance(r.value, dict) and _is_point_offer(r.value)]
        if not wanted:
            return
        try:
            messages = [MessageRequested.model_validate(r.value) for r in wanted]
        except ValidationError as exc:
            raise PoisonMessage(f"not a message request: {exc.errors()[:3]}") from exc
        try:
            await point_offers.record_requests(
                session=session, messages=messages, programme=await load_programme(session), now=clock.now()
            )
        except point_offers.UnusableOffer as exc:
            raise PoisonMessage(str(exc)) from exc

    return handle


def _is_point_offer(value: dict[str, object]) -> bool:
    variables = value.get("variables")
    return isinstance(variables, dict) and variables.get("offer_kind") == point_offers.KIND
