"""Bonus-points multipliers promised by offers' campaigns.

Offers requests a message with `variables.offer_kind == "points_multiplier"` on crm.messages.v1 (kind marketing,
`campaign_id`, `offer_id`, `variables.multiplier`, `variables.valid_until`). Loyalty records each such request
(`point_offers`, one row per message id) and the rule is:

* it covers purchases from the request's `occurred_at` up to the end of `valid_until` (a date: through the end of
  that UTC day; a date-time: up to it; missing: the message's `expires_at`);
* it is used once: the first covered purchase that earns points gets `floor(base points x (multiplier - 1))`
  extra, booked as its own `offer_bonus` ledger entry (own lot, `data.campaign_id` / `data.offer_id`) and
  published as `points.accrued` with the same data plus `campaign_points`, `point_value` and `value`;
* a purchase earns at most one offer's bonus: of several open ones, the highest multiplier (then the one ending
  first) is used;
* a refund reverses the bonus in the same proportion as the base points (`points.reversed` with
  `data.reverses = "offer_bonus"`, negative `campaign_points`);
* when the request reaches loyalty after a purchase it covers (the two topics are not ordered with each other),
  the bonus is booked then, on the first covered purchase not refunded and not used by another offer.

Redelivery of the message or of the purchase changes nothing: the message id is the row's key (and the inbox's),
the purchase accrues once per order, and each entry's ref derives from its cause.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import MessageRequested
from loyalty.ledger import ZERO, Book, floor_points, round_points
from loyalty.schemas import ProgrammeConfig
from loyalty.state import AccountState, PointOfferState

KIND = "points_multiplier"


class UnusableOffer(Exception):
    """A points-multiplier request loyalty cannot apply (no campaign, multiplier or validity): it goes to the DLQ."""


def _valid_until(msg: MessageRequested) -> datetime:
    raw = msg.variables.get("valid_until")
    if isinstance(raw, str) and raw:
        try:
            if len(raw) == 10:  # a date: valid through the end of that day (UTC)
                return datetime.combine(date.fromisoformat(raw) + timedelta(days=1), time(), tzinfo=UTC)
            at = datetime.fromisoformat(raw)
            return at if at.tzinfo else at.replace(tzinfo=UTC)
        except ValueError as exc:
            raise UnusableOffer(f"message {msg.id}: valid_until {raw!r} is not a date") from exc
    if msg.expires_at is not None:
        return msg.expires_at
    raise UnusableOffer(f"message {msg.id}: a points_multiplier offer without valid_until or expires_at")


def offer_of(msg: MessageRequested) -> PointOfferState | None:
    """The offer a message request carries, or None when it is no points-multiplier offer."""
    if msg.variables.get("offer_kind") != KIND:
        return None
    if not msg.campaign_id or not msg.offer_id:
        raise UnusableOffer(f"message {msg.id}: a points_multiplier offer without campaign_id or offer_id")
    try:
        multiplier = Decimal(str(msg.variables.get("multiplier")))
    except InvalidOperation as exc:
        raise UnusableOffer(f"message {msg.id}: multiplier {msg.variables.get('multiplier')!r} is no number") from exc
    if not multiplier.is_finite() or multiplier <= 1 or multiplier > 100:
        raise UnusableOffer(f"message {msg.id}: multiplier {multiplier} is not above 1 (and at most 100)")
    return PointOfferState(
        message_id=msg.id,
        customer_id=msg.customer_id,
        campaign_id=msg.campaign_id,
        offer_id=msg.offer_id,
        multiplier=multiplier,
        requested_at=msg.occurred_at,
        valid_until=_valid_until(msg),
    )


def covers(offer: PointOfferState, at: datetime) -> bool:
    return offer.order_id is None and offer.requested_at <= at < offer.valid_until


def best(offers: list[PointOfferState], at: datetime) -> PointOfferState | None:
    """The open offer a purchase at `at` uses: the highest multiplier, then the one ending first."""
    usable = [o for o in offers if covers(o, at)]
    if not usable:
        return None
    return min(usable, key=lambda o: (-o.multiplier, o.valid_until, o.message_id))


def _data(offer: PointOfferState, campaign_points: Decimal, programme: ProgrammeConfig) -> dict[str, Any]:
    return {
        "campaign_id": offer.campaign_id,
        "offer_id": offer.offer_id,
        "message_id": offer.message_id,
        "multiplier": str(offer.multiplier),
        "campaign_points": str(campaign_points),
        "point_value": str(programme.point_value),
        "value": str(round_points(campaign_points * programme.point_value)),
    }


def award(
    book: Book, acct: AccountState, offer: PointOfferState, *, order_id: str, base_points: Decimal, at: datetime
) -> Decimal:
    """Book the offer's extra points for a purchase that earned `base_points`; return them (0: offer left open)."""
    extra = floor_points(base_points * (offer.multiplier - 1))
    if extra <= 0:
        return ZERO
    offer.order_id = order_id
    offer.points = extra
    offer.used_at = at
    offer.dirty = True
    book.credit(
        acct,
        kind="offer_bonus",
        points=extra,
        ref=f"offer_bonus:{offer.message_id}",
        at=at,
        order_id=order_id,
        data={"reason": "offer_bonus", "base_points": str(base_points), **_data(offer, extra, book.programme)},
        event_type="points.accrued",  # always: offers counts the campaign's cost from it
    )
    return extra


async def reverse(
    book: Book, acct: AccountState, offer: PointOfferState, *, share: Decimal | None, ref: str, at: datetime
) -> None:
    """Take back the bonus in proportion to the money refunded (`share`; None: the whole purchase)."""
    target = offer.points if share is None else round_points(offer.points * share)
    to_reverse = target - offer.points_reversed
    if to_reverse <= 0:
        return
    await book.debit(
        acct,
        kind="reversal",
        points=to_reverse,
        ref=ref,
        at=at,
        prefer_lot=f"offer_bonus:{offer.message_id}",
        owe_shortfall=True,
        order_id=offer.order_id,
        data={"reverses": "offer_bonus", "requested": str(to_reverse), **_data(offer, -to_reverse, book.programme)},
        event_type="points.reversed",
    )
    offer.points_reversed += to_reverse
    offer.dirty = True


async def record_requests(
    *, session: AsyncSession, messages: list[MessageRequested], programme: ProgrammeConfig, now: datetime
) -> int:
    """Record the points-multiplier offers among message requests; book the bonus of any covered purchase that
    was applied before its offer arrived. Returns the number of new offers."""
    offers: list[PointOfferState] = []
    for msg in messages:
        offer = offer_of(msg)
        if offer is not None:
            offers.append(offer)
    if not offers:
        return 0
    book = Book(session, programme, now)
    # Lock the accounts first (accrual locks them before reading the open offers), so an offer and a purchase
    # applied concurrently cannot both miss each other. A customer without an account has no purchases yet.
    accounts = await book.open(sorted({o.customer_id for o in offers}), create=False)
    new_ids = await book.repo.insert_point_offers(offers)
    fresh = [o for o in offers if o.message_id in new_ids and o.customer_id in accounts]
    purchases = await book.repo.purchases_for_offers(fresh)
    used: set[tuple[str, str]] = set()
    for offer in sorted(fresh, key=lambda o: (-o.multiplier, o.valid_until, o.message_id)):
        pur = purchases.get(offer.message_id)
        if pur is None or (pur.customer_id, pur.order_id) in used:
            continue
        if award(
            book,
            accounts[offer.customer_id],
            offer,
            order_id=pur.order_id,
            base_points=pur.points_accrued,
            at=pur.occurred_at,
        ):
            used.add((pur.customer_id, pur.order_id))
    book.repo.defer()
    await book.repo.update_point_offers([o for o in fresh if o.dirty])
    await book.flush()
    return len(new_ids)
