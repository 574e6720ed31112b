"""Turn events into facts and recompute the profiles they touch, by event time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from crm_common.consumer import PoisonMessage, Record
from crm_common.contract.events import (
    EVENT_TYPES,
    CustomerUpdatedProps,
    FeedbackProps,
    PurchaseProps,
    RefundProps,
    SiteVisitProps,
)
from crm_common.contract.messages import DeliveryEvent
from segmentation.repository.facts import (
    FactRepository,
    IdentityLink,
    PurchaseFact,
    RefundFact,
    TraitFact,
)
from segmentation.repository.profiles import ProfileRepository
from segmentation.segments import begin_batch, evaluate_for_customers

# Events that change no feature: accepted and counted by the inbox, no recompute.
PASSIVE_TYPES = {"product_viewed", "cart_updated", "custom"}
# A batch is parsed and stored in chunks of this many events, the store of one overlapping the
# parsing of the next; parsing yields to the event loop every YIELD_EVERY events.
CHUNK_EVENTS = 500
YIELD_EVERY = 16


@dataclass
class FactBatch:
    """Facts collected from one batch of events, deduplicated by natural key."""

    traits: dict[tuple[str, str], TraitFact] = field(default_factory=dict)
    first_touch: dict[tuple[str, str], TraitFact] = field(default_factory=dict)
    purchases: dict[tuple[str, str], PurchaseFact] = field(default_factory=dict)
    refunds: list[RefundFact] = field(default_factory=list)
    identities: dict[str, IdentityLink] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)

    def trait(self, fact: TraitFact, *, first_wins: bool = False) -> None:
        target = self.first_touch if first_wins else self.traits
        key = (fact.customer_id, fact.field)
        old = target.get(key)
        newer = old is None or (fact.occurred_at, fact.message_id) > (
            old.occurred_at,
            old.message_id,
        )
        if old is None or newer != first_wins:
            target[key] = fact
        self.touched.add(fact.customer_id)


def _json(value: Any) -> str:
    return serde.dumps(value).decode()


def _purchase_fact(customer_id: str, msg: Envelope, props: PurchaseProps, message_id: str) -> PurchaseFact:
    items = []
    gross = Decimal(0)
    item_discounts = Decimal(0)
    cost = Decimal(0)
    has_cost = False
    for it in props.items:
        line_gross = it.unit_price * it.quantity
        line_discount = it.discount or Decimal(0)
        gross += line_gross
        item_discounts += line_discount
        if it.cost is not None:
            has_cost = True
            cost += it.cost * it.quantity
        items.append(
            {
                "sku": it.sku,
                "name": it.name,
                "category": it.category,
                "size": it.size,
                "color": it.color,
                "quantity": it.quantity,
                "amount": max(Decimal(0), line_gross - line_discount),
            }
        )
    discount = max(item_discounts, gross - props.total, Decimal(0))
    local = msg.occurred_at  # keeps the offset the POS sent: "Friday" is the store's Friday
    return PurchaseFact(
        customer_id=customer_id,
        order_id=props.order_id,
        message_id=message_id,
        occurred_at=msg.occurred_at,
        local_date=local.date(),
        local_dow=local.isoweekday(),
        local_hour=local.hour,
        total=props.total,
        gross=gross,
        discount=discount,
        cost=cost if has_cost else None,
        discounted=discount > 0 or props.coupon_code is not None,
        items=items,
    )


def collect_event(batch: FactBatch, record: Record, msg: Envelope, customer_id: str) -> None:
    """Add the facts of one event to the batch."""
    t, mid, at = msg.type, record.id, msg.occurred_at
    if t == "customer_updated":
        props = CustomerUpdatedProps.model_validate(msg.properties)
        raw = props.model_dump(mode="json", exclude_unset=True)
        for name, value in raw.items():
            if name == "consents":
                for channel, flag in (value or {}).items():
                    batch.trait(
                        TraitFact(
                            customer_id=customer_id,
                            field=f"consents.{channel}",
                            value_json=_json(flag),
                            occurred_at=at,
                            message_id=mid,
                        )
                    )
            else:
                batch.trait(
                    TraitFact(
                        customer_id=customer_id, field=name, value_json=_json(value), occurred_at=at, message_id=mid
                    )
                )
        if value_is_null_consents(raw):
            for channel in ("email", "sms", "push"):
                batch.trait(
                    TraitFact(
                        customer_id=customer_id,
                        field=f"consents.{channel}",
                        value_json="null",
                        occurred_at=at,
                        message_id=mid,
                    )
                )
        if msg.anonymous_id:
            old = batch.identities.get(msg.anonymous_id)
            if old is None or at > old.occurred_at:
                batch.identities[msg.anonymous_id] = IdentityLink(
                    anonymous_id=msg.anonymous_id, customer_id=customer_id, occurred_at=at
                )
        batch.touched.add(customer_id)
    elif t == "purchase":
        fact = _purchase_fact(customer_id, msg, PurchaseProps.model_validate(msg.properties), mid)
        key = (customer_id, fact.order_id)
        if key not in batch.purchases or fact.message_id < batch.purchases[key].message_id:
            batch.purchases[key] = fact
        batch.touched.add(customer_id)
    elif t == "refund":
        rp = RefundProps.model_validate(msg.properties)
        items = [{"sku": i.sku, "quantity": str(i.quantity)} for i in rp.items] if rp.items else None
        batch.refunds.append(
            RefundFact(
                customer_id=customer_id,
                refund_id=mid,
                order_id=rp.order_id,
                amount=rp.amount,
                occurred_at=at,
                items=items,
            )
        )
        batch.touched.add(customer_id)
    elif t == "feedback":
        fp = FeedbackProps.model_validate(msg.properties)
        batch.trait(
            TraitFact(
                customer_id=customer_id,
                field="_feedback",
                value_json=_json({"rating": fp.rating, "topic": fp.topic, "order_id": fp.order_id}),
                occurred_at=at,
                message_id=mid,
            )
        )
    elif t == "site_visit":
        sp = SiteVisitProps.model_validate(msg.properties)
        if sp.utm_source:
            batch.trait(
                TraitFact(
                    customer_id=customer_id,
                    field="_first_touch",
                    value_json=_json([sp.utm_source]),
                    occurred_at=at,
                    message_id=mid,
                ),
                first_wins=True,
            )


class Envelope:
    """The fields of an EventMessage this service reads (a light parse on the hot path)."""

    __slots__ = ("anonymous_id", "customer_id", "occurred_at", "properties", "type")

    def __init__(
        self,
        type_: str,
        customer_id: str | None,
        anonymous_id: str | None,
        occurred_at: datetime,
        properties: dict[str, Any],
    ) -> None:
        self.type = type_
        self.customer_id = customer_id
        self.anonymous_id = anonymous_id
        self.occurred_at = occurred_at
        self.properties = properties


def parse_envelope(value: dict[str, Any]) -> Envelope:
    """Read the envelope of an event message; properties are validated per type later."""
    type_ = value.get("type")
    customer_id = value.get("customer_id")
    anonymous_id = value.get("anonymous_id")
    properties = value.get("properties") or {}
    try:
        if not isinstance(type_, str) or type_ not in EVENT_TYPES:
            raise ValueError(f"unknown type {type_!r}")
        for name, v in (("customer_id", customer_id), ("anonymous_id", anonymous_id)):
            if v is not None and (not isinstance(v, str) or not 0 < len(v) <= 128 or "\x00" in v):
                raise ValueError(f"{name} must be a string of 1-128 characters without NUL")
        if not isinstance(properties, dict):
            raise ValueError("properties must be an object")
        occurred_at = datetime.fromisoformat(value["occurred_at"])
        if occurred_at.tzinfo is None:
            raise ValueError("occurred_at needs a UTC offset")
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonMessage(f"not an event message: {exc}") from exc
    return Envelope(type_, customer_id, anonymous_id, occurred_at, properties)


def value_is_null_consents(raw: dict[str, Any]) -> bool:
    """`"consents": null` clears every consent."""
    return "consents" in raw and raw["consents"] is None


class FactWriter:
    """Stores the facts of one chunk of a batch while the next chunk is parsed.

    The store runs as a task on the batch's session, one statement at a time; parsing never
    touches the session and yields to the event loop every few events, so the database writes
    chunk n while Python validates chunk n + 1 (the two use different cores).
    """

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.facts = FactRepository(session)
        self.started = False
        self.pending: asyncio.Task[None] | None = None

    async def submit(self, batch: FactBatch) -> None:
        """Wait for the previous chunk, then start storing this one."""
        await self.wait()
        self.pending = asyncio.create_task(self._store(batch, first=not self.started))
        self.started = True
        await asyncio.sleep(0)  # let the task send its first statement

    async def wait(self) -> None:
        """Wait for the chunk being stored; its error, if any, is raised here."""
        if self.pending is not None:
            task, self.pending = self.pending, None
            await task

    async def settle(self) -> None:
        """Let the statement in flight finish (errors ignored) before the transaction is abandoned."""
        if self.pending is not None:
            task, self.pending = self.pending, None
            await asyncio.gather(task, return_exceptions=True)

    async def _store(self, batch: FactBatch, *, first: bool) -> None:
        if first:
            await begin_batch(session=self.session)
        await self.facts.upsert_traits(list(batch.traits.values()))
        await self.facts.upsert_traits(list(batch.first_touch.values()), first_wins=True)
        await self.facts.upsert_purchases(list(batch.purchases.values()))
        await self.facts.insert_refunds(batch.refunds)


async def _collect_chunk(chunk: list[tuple[Record, Envelope, str]], identities: dict[str, IdentityLink]) -> FactBatch:
    """The facts of a chunk of events (identity links go to the batch-wide `identities`)."""
    batch = FactBatch(identities=identities)
    for n, (rec, msg, customer_id) in enumerate(chunk):
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # the writer sends its next statement
        try:
            collect_event(batch, rec, msg, customer_id)
        except ValidationError as exc:
            raise PoisonMessage(f"invalid {msg.type} properties: {exc.errors()[:3]}") from exc
    return batch


async def apply_events(*, session: AsyncSession, records: list[Record], now: datetime, decay_days: float) -> set[str]:
    """Store the facts of a batch of events, recompute touched profiles and their segments."""
    facts = FactRepository(session)
    parsed: list[tuple[Record, Envelope]] = []
    for rec in records:
        msg = parse_envelope(rec.value)
        if msg.type in PASSIVE_TYPES:
            continue
        parsed.append((rec, msg))
    # customer_updated events carry identity links first, so that anonymous events of the same batch resolve.
    identities: dict[str, IdentityLink] = {}
    for _, msg in parsed:
        if msg.type == "customer_updated" and msg.customer_id and msg.anonymous_id:
            identities[msg.anonymous_id] = IdentityLink(
                anonymous_id=msg.anonymous_id, customer_id=msg.customer_id, occurred_at=msg.occurred_at
            )
    anonymous = {msg.anonymous_id for _, msg in parsed if not msg.customer_id and msg.anonymous_id}
    resolved = await facts.resolve_anonymous(sorted(anonymous)) if anonymous else {}
    for anon, link in identities.items():
        resolved.setdefault(anon, link.customer_id)
    # An anonymous visitor not linked to a customer yet carries no profile.
    linked = [
        (rec, msg, customer_id)
        for rec, msg in parsed
        if (customer_id := msg.customer_id or resolved.get(msg.anonymous_id or ""))
    ]
    writer = FactWriter(session)
    touched: set[str] = set()
    buyers: set[str] = set()
    try:
        for i in range(0, len(linked), CHUNK_EVENTS):
            batch = await _collect_chunk(linked[i : i + CHUNK_EVENTS], identities)
            if batch.touched:
                await writer.submit(batch)
            touched |= batch.touched
            buyers |= {c for c, _ in batch.purchases} | {r.customer_id for r in batch.refunds}
        await writer.wait()
    except BaseException:
        await writer.settle()
        raise
    if not touched:
        return set()
    await facts.upsert_identities(list(identities.values()))
    # Refunds are matched to orders whichever arrives first: re-match for customers that have any.
    with_refunds = await facts.customers_with_refunds(sorted(buyers)) if buyers else []
    if with_refunds:
        await facts.apply_refunds(with_refunds)
    ordered = sorted(touched)
    await ProfileRepository(session).recompute(ordered, now=now, decay_days=decay_days)
    await evaluate_for_customers(session=session, customer_ids=ordered, now=now)
    return touched


async def apply_deliveries(
    *, session: AsyncSession, records: list[Record], now: datetime, decay_days: float
) -> set[str]:
    """Store delivery outcomes and refresh the engagement of the customers they concern."""
    facts: dict[tuple[str, str], DeliveryEvent] = {}
    for rec in records:
        try:
            msg = DeliveryEvent.model_validate(rec.value)
        except ValidationError as exc:
            raise PoisonMessage(f"not a delivery event: {exc.errors()[:3]}") from exc
        facts.setdefault((msg.message_id, msg.status), msg)
    if not facts:
        return set()
    await begin_batch(session=session)
    await FactRepository(session).insert_deliveries(list(facts.values()))
    touched = sorted({f.customer_id for f in facts.values()})
    await ProfileRepository(session).recompute(touched, now=now, decay_days=decay_days)
    await evaluate_for_customers(session=session, customer_ids=touched, now=now)
    return set(touched)
