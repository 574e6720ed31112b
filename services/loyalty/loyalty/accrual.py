"""Apply events from `crm.events.v1`: accounts on first sight, accruals, reversals, referral and birthday facts."""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import EventMessage, PurchaseProps, RefundProps
from loyalty import goals, point_offers, referrals
from loyalty.ledger import ZERO, Book, floor_points, round_points
from loyalty.repository import utc_month
from loyalty.schemas import ProgrammeConfig
from loyalty.state import AccountState, GoalState, PointOfferState, PurchaseState

log = logging.getLogger(__name__)


class UnusableEvent(Exception):
    """An event whose properties cannot be applied (it goes to the DLQ)."""


def eligible_share(props: PurchaseProps, programme: ProgrammeConfig) -> Decimal:
    """Share of the check that earns points, after category multipliers and exclusions."""
    gross = ZERO
    weighted = ZERO
    for item in props.items:
        net = max(item.quantity * item.unit_price - (item.discount or ZERO), ZERO)
        gross += net
        weighted += net * programme.multiplier(item.category)
    if gross <= 0:
        return Decimal(1)
    return weighted / gross


class EventApplier:
    """One batch of events applied through one Book (one transaction)."""

    def __init__(self, book: Book) -> None:
        self.book = book
        self.programme = book.programme
        self.purchases: dict[tuple[str, str], PurchaseState] = {}
        self.goals: dict[str, GoalState] = {}
        self.spend_by_month: dict[tuple[str, date], Decimal] = {}
        self.offers: dict[str, list[PointOfferState]] = {}  # open points-multiplier offers per buyer
        self.offer_of_order: dict[tuple[str, str], PointOfferState] = {}  # the offer a recorded purchase used

    async def apply(self, events: list[EventMessage]) -> None:
        book = self.book
        parsed: list[tuple[str, EventMessage, Any]] = []  # (customer_id, event, its properties)
        for e in events:
            if not e.customer_id:
                continue
            try:
                props: Any = None
                if e.type == "purchase":
                    props = PurchaseProps.model_validate(e.properties)
                elif e.type == "refund":
                    props = RefundProps.model_validate(e.properties)
                parsed.append((e.customer_id, e, props))
            except ValidationError as exc:
                raise UnusableEvent(f"event {e.id}: invalid {e.type} properties: {exc.errors()[:3]}") from exc
        if not parsed:
            return
        first_seen: dict[str, datetime] = {}
        for cid, e, _ in parsed:
            first_seen.setdefault(cid, e.occurred_at)
        await book.open(sorted(first_seen), create=True, at=first_seen)
        keyed = [(cid, p.order_id) for cid, _, p in parsed if p is not None]
        for pur in await book.repo.purchases_for(set(keyed)):
            self.purchases[(pur.customer_id, pur.order_id)] = pur
        buyers = sorted({cid for cid, _, p in parsed if p is not None})
        if buyers and self.programme.tiers:
            since = book.now - timedelta(days=self.programme.tier_window_days)
            spend = await book.repo.spend_since(buyers, since)
            for cid in buyers:
                book.accounts[cid].spend = spend.get(cid, ZERO)
        await book.load_redemptions([p.redemption_id for _, e, p in parsed if e.type == "purchase" and p.redemption_id])
        if buyers:
            self.goals = {g.customer_id: g for g in await book.repo.active_goals(buyers)}
        await self.load_offers(parsed)
        for cid, e, props in parsed:
            acct = book.accounts[cid]
            if e.type == "purchase":
                await self.purchase(acct, e, props)
            elif e.type == "refund":
                await self.refund(acct, e, props)
            elif e.type == "customer_updated":
                await self.customer_updated(acct, e)
        await self.write()

    # -- purchases -------------------------------------------------------------------------------

    async def purchase(self, acct: AccountState, e: EventMessage, p: PurchaseProps) -> None:
        key = (acct.customer_id, p.order_id)
        if key in self.purchases:
            return  # the same order again (a resend under another event id) accrues once
        book, programme = self.book, self.programme
        money_from_points, redeemed, status = self.reconcile(acct, e, p)
        paid = max(p.total - money_from_points, ZERO)
        self.add_spend(acct.customer_id, e.occurred_at, paid)
        tier_rate = self.update_tier(acct, paid, cause=e.id, at=e.occurred_at)
        points = floor_points(paid * eligible_share(p, programme) * tier_rate / programme.point_value)
        ref = f"accrual:{e.id}"
        if points > 0:
            book.credit(
                acct,
                kind="accrual",
                points=points,
                ref=ref,
                at=e.occurred_at,
                order_id=p.order_id,
                data={"paid": str(paid), "tier": acct.tier},
                event_type="points.accrued" if book.publish_accruals else None,
            )
            offer = point_offers.best(self.offers.get(acct.customer_id, []), e.occurred_at)
            if offer is not None and point_offers.award(
                book, acct, offer, order_id=p.order_id, base_points=points, at=e.occurred_at
            ):
                self.offer_of_order[key] = offer
        self.purchases[key] = PurchaseState(
            customer_id=acct.customer_id,
            order_id=p.order_id,
            message_id=e.id,
            occurred_at=e.occurred_at,
            total=p.total,
            paid=paid,
            refunded=ZERO,
            points_accrued=points,
            points_reversed=ZERO,
            redemption_id=p.redemption_id,
            points_redeemed=redeemed,
            points_returned=ZERO,
            reconciliation=status,
            is_new=True,
        )
        acct.purchases_count += 1
        acct.dirty = True
        if acct.first_purchase_at is None or e.occurred_at < acct.first_purchase_at:
            acct.first_purchase_at = e.occurred_at
        if acct.last_purchase_at is None or e.occurred_at > acct.last_purchase_at:
            acct.last_purchase_at = e.occurred_at
        goal = self.goals.get(acct.customer_id)
        if goal is not None:
            goals.count_purchase(book, acct, goal, at=e.occurred_at)
        if acct.purchases_count == 1:
            await referrals.reward_first_purchase(book, acct, at=e.occurred_at)

    async def load_offers(self, parsed: list[tuple[str, EventMessage, Any]]) -> None:
        """The buyers' open points-multiplier offers, and the offers used by the orders refunded in the batch."""
        buyers = sorted({cid for cid, e, _ in parsed if e.type == "purchase"})
        refunded = {(cid, p.order_id) for cid, e, p in parsed if e.type == "refund"}
        if not buyers and not refunded:
            return
        since = min(e.occurred_at for _, e, _ in parsed if e.type == "purchase") if buyers else self.book.now
        for o in await self.book.repo.point_offers_for(buyers, since, sorted(refunded)):
            if o.order_id is None:
                self.offers.setdefault(o.customer_id, []).append(o)
            else:
                self.offer_of_order[(o.customer_id, o.order_id)] = o

    def reconcile(self, acct: AccountState, e: EventMessage, p: PurchaseProps) -> tuple[Decimal, Decimal, str | None]:
        """Match the purchase's redemption: (money paid with points, points redeemed, reconciliation status)."""
        pv = self.programme.point_value
        claimed = p.points_redeemed
        if p.redemption_id is None:
            if claimed:
                return claimed * pv, ZERO, "no_redemption_id"
            return ZERO, ZERO, None
        r = self.book.redemptions.get(p.redemption_id)
        if r is None or r.customer_id != acct.customer_id:
            # Not debited through this service: the points were not paid with, so the whole total earns.
            return ZERO, ZERO, "unknown_redemption"
        if r.status == "cancelled":
            return ZERO, ZERO, "cancelled_redemption"
        if r.status == "settled" and r.order_id != p.order_id:
            return ZERO, ZERO, "redemption_already_settled"
        r.status = "settled"
        r.order_id = p.order_id
        r.settled_at = e.occurred_at
        r.dirty = True
        status = "matched" if claimed is None or claimed == r.points_applied else "points_mismatch"
        return r.money_applied, r.points_applied - r.points_returned, status

    def add_spend(self, customer_id: str, occurred_at: datetime, amount: Decimal) -> None:
        """Count money paid (or refunded, negative) in the month of its purchase, for spend_months."""
        key = (customer_id, utc_month(occurred_at))
        self.spend_by_month[key] = self.spend_by_month.get(key, ZERO) + amount

    def update_tier(self, acct: AccountState, spend_delta: Decimal, *, cause: str, at: datetime) -> Decimal:
        """Move the 12-month spend and the tier; publish a tier change; return the accrual rate."""
        programme = self.programme
        if not programme.tiers:
            return programme.base_rate
        acct.spend = (acct.spend or ZERO) + spend_delta
        tier, rate = programme.tier_for(acct.spend)
        if tier != acct.tier:
            self.book.event(
                acct.customer_id,
                "tier.changed",
                ref=f"tier:{cause}",
                at=at,
                data={"from": acct.tier, "to": tier, "spend_12m": str(acct.spend)},
            )
            acct.tier = tier
            acct.dirty = True
        return rate

    # -- refunds ---------------------------------------------------------------------------------

    async def refund(self, acct: AccountState, e: EventMessage, r: RefundProps) -> None:
        """Reverse accrued points and return redeemed ones in proportion to the money refunded."""
        pur = self.purchases.get((acct.customer_id, r.order_id))
        if pur is None:
            log.warning("refund %s for unknown order %s of %s ignored", e.id, r.order_id, acct.customer_id)
            return
        amount = min(r.amount, pur.paid - pur.refunded)
        if amount <= 0:
            return
        book = self.book
        pur.refunded += amount
        pur.dirty = True
        full = pur.refunded >= pur.paid
        share = Decimal(1) if full else pur.refunded / pur.paid
        to_return = (pur.points_redeemed if full else round_points(pur.points_redeemed * share)) - pur.points_returned
        if to_return > 0 and pur.redemption_id:
            red = book.redemptions.get(pur.redemption_id)
            if red is None:
                await book.load_redemptions([pur.redemption_id])
                red = book.redemptions.get(pur.redemption_id)
            if red is not None:
                pur.points_returned += await book.return_redeemed(
                    acct,
                    red,
                    to_return,
                    ref=f"return:{e.id}",
                    at=e.occurred_at,
                    reason="refund",
                    order_id=r.order_id,
                )
        to_reverse = (pur.points_accrued if full else round_points(pur.points_accrued * share)) - pur.points_reversed
        if to_reverse > 0:
            # Points already spent cannot be taken below zero: what is missing becomes the account's debt,
            # netted against its next credits.
            await book.debit(
                acct,
                kind="reversal",
                points=to_reverse,
                ref=f"reversal:{e.id}",
                at=e.occurred_at,
                prefer_lot=f"accrual:{pur.message_id}",
                owe_shortfall=True,
                order_id=r.order_id,
                data={"reverses": "accrual", "requested": str(to_reverse)},
                event_type="points.reversed",
            )
            pur.points_reversed += to_reverse
        offer = self.offer_of_order.get((acct.customer_id, r.order_id))
        if offer is not None:
            await point_offers.reverse(
                book, acct, offer, share=None if full else share, ref=f"bonus_reversal:{e.id}", at=e.occurred_at
            )
        self.add_spend(acct.customer_id, pur.occurred_at, -amount)
        self.update_tier(acct, -amount, cause=e.id, at=e.occurred_at)

    # -- profile facts ---------------------------------------------------------------------------

    async def customer_updated(self, acct: AccountState, e: EventMessage) -> None:
        props = e.properties
        if "birth_date" in props:
            value = props["birth_date"]
            try:
                acct.birth_date = date.fromisoformat(value) if isinstance(value, str) else None
            except ValueError:
                acct.birth_date = None
            acct.dirty = True
        code = props.get("referred_by")
        if isinstance(code, str) and code:
            await referrals.link(self.book, acct, code, at=e.occurred_at)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self) -> None:
        repo = self.book.repo
        repo.defer()  # flushed with the book's writes as one statement
        await repo.insert_purchases([p for p in self.purchases.values() if p.is_new])
        await repo.update_purchases([p for p in self.purchases.values() if p.dirty and not p.is_new])
        await repo.add_monthly_spend({key: amount for key, amount in self.spend_by_month.items() if amount})
        await repo.update_goals([g for g in self.goals.values() if g.dirty])
        offers = {o.message_id: o for os in self.offers.values() for o in os} | {
            o.message_id: o for o in self.offer_of_order.values()
        }
        await repo.update_point_offers([o for o in offers.values() if o.dirty])
        await self.book.flush()


async def apply_events(
    *,
    session: AsyncSession,
    events: list[EventMessage],
    programme: ProgrammeConfig,
    now: datetime,
    publish_accruals: bool = True,
) -> None:
    """Apply a batch of events, in order, in the caller's transaction."""
    book = Book(session, programme, now, publish_accruals=publish_accruals)
    await EventApplier(book).apply(events)
