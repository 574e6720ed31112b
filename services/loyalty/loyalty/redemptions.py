"""Redemptions at the POS (idempotent by redemption_id, capped by the programme) and their cancellation."""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from loyalty.errors import (
    AccountNotFound,
    IdempotencyConflict,
    InsufficientPoints,
    RedemptionNotCancellable,
    RedemptionNotFound,
)
from loyalty.ledger import Book, floor_points
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig, RedemptionCreate, RedemptionRead
from loyalty.settings import TOPIC_LOYALTY
from loyalty.state import Allocation, RedemptionState

MONEY_CENT = Decimal("0.01")


def request_hash(redemption_in: RedemptionCreate) -> str:
    body = serde.dumps(redemption_in.model_dump(mode="json"))
    return hashlib.sha256(body).hexdigest()


def _money(value: Decimal) -> Decimal:
    """Cents, or up to 4 places when the amount has them: the same text for a fresh answer and a replay."""
    cents = value.quantize(MONEY_CENT)
    return cents if cents == value else value.quantize(Decimal("0.0001"))


def _points(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(MONEY_CENT)


def to_read(r: RedemptionState) -> RedemptionRead:
    return RedemptionRead(
        redemption_id=r.redemption_id,
        customer_id=r.customer_id,
        status=r.status,
        check_amount=_money(r.check_amount),
        points_requested=_points(r.points_requested),
        points_applied=_points(r.points_applied),
        money_applied=_money(r.money_applied),
        points_returned=_points(r.points_returned),
        balance=_points(r.balance_after),
        order_id=r.order_id,
        created_at=r.created_at,
        cancelled_at=r.cancelled_at,
    )


def _replay(existing: RedemptionState, digest: str) -> RedemptionRead:
    if existing.request_hash != digest:
        raise IdempotencyConflict(
            f"redemption {existing.redemption_id!r} exists with a different request",
            details={"redemption_id": existing.redemption_id},
        )
    return to_read(existing)


async def _existing(session: AsyncSession, redemption_id: str) -> RedemptionState | None:
    found = await LoyaltyRepository(session).get_redemptions([redemption_id])
    return found[0] if found else None


async def redeem(
    *,
    session: AsyncSession,
    programme: ProgrammeConfig,
    redemption_in: RedemptionCreate,
    now: datetime,
) -> tuple[RedemptionRead, bool]:
    """Apply points to a check, at most `max_redeem_share` of it; return (result, created)."""
    digest = request_hash(redemption_in)
    _, wanted = _points_wanted(programme, redemption_in)
    if wanted > 0:
        # The common case in one round trip; anything else (replay, 409, unknown account, nothing spendable)
        # changes nothing there and is answered below.
        row = await LoyaltyRepository(session).redeem_new(
            redemption_id=redemption_in.redemption_id,
            customer_id=redemption_in.customer_id,
            request_hash=digest,
            check_amount=redemption_in.check_amount,
            points_requested=redemption_in.points,
            wanted=wanted,
            point_value=programme.point_value,
            order_id=redemption_in.order_id,
            store_id=redemption_in.store_id,
            now=now,
            now_iso=now.isoformat(),
            check_text=str(redemption_in.check_amount),
            topic=TOPIC_LOYALTY,
        )
        if row is not None:
            state = _new_state(redemption_in, digest, row["points_applied"], row["money_applied"], now)
            state.balance_after = row["balance_after"]
            return to_read(state), True
    return await redeem_in_book(session=session, programme=programme, redemption_in=redemption_in, now=now)


def _points_wanted(programme: ProgrammeConfig, redemption_in: RedemptionCreate) -> tuple[Decimal, Decimal]:
    """(the most points the check allows, the points to apply if the account has them)."""
    max_points = floor_points(redemption_in.check_amount * programme.max_redeem_share / programme.point_value)
    wanted = min(redemption_in.points, max_points) if redemption_in.points is not None else max_points
    return max_points, wanted


def _new_state(
    redemption_in: RedemptionCreate, digest: str, applied: Decimal, money: Decimal, now: datetime
) -> RedemptionState:
    return RedemptionState(
        redemption_id=redemption_in.redemption_id,
        customer_id=redemption_in.customer_id,
        request_hash=digest,
        check_amount=redemption_in.check_amount,
        points_requested=redemption_in.points,
        points_applied=applied,
        money_applied=money,
        points_returned=Decimal(0),
        status="applied",
        order_id=redemption_in.order_id,
        store_id=redemption_in.store_id,
        created_at=now,
        settled_at=None,
        cancelled_at=None,
    )


async def redeem_in_book(
    *,
    session: AsyncSession,
    programme: ProgrammeConfig,
    redemption_in: RedemptionCreate,
    now: datetime,
) -> tuple[RedemptionRead, bool]:
    """Redeem through the Book: the general path of `redeem`, for every case, with the rules loyalty_redeem() has
    for the common one (tests/test_rules.py pins the two together)."""
    digest = request_hash(redemption_in)
    max_points, wanted = _points_wanted(programme, redemption_in)
    rid = redemption_in.redemption_id
    book = Book(session, programme, now)
    acct = (await book.open([redemption_in.customer_id], create=False)).get(redemption_in.customer_id)
    if acct is None:
        if (existing := await _existing(session, rid)) is not None:
            return _replay(existing, digest), False
        raise AccountNotFound(f"no loyalty account for customer {redemption_in.customer_id!r}")
    available = await book.spendable(acct)
    applied = min(wanted, available)
    if applied <= 0:
        # A retry of a redemption that emptied the account is a replay, not a refusal.
        if (existing := await _existing(session, rid)) is not None:
            return _replay(existing, digest), False
        raise InsufficientPoints(
            "no points can be applied to this check",
            details={"available": str(available), "max_points_for_check": str(max_points)},
        )
    money = (applied * programme.point_value).quantize(MONEY_CENT, rounding=ROUND_DOWN)
    state = _new_state(redemption_in, digest, applied, money, now)
    if not await book.repo.insert_redemption(state):
        # The id exists (a retry, or the same id used for another check): answer as the first time or 409.
        existing = await _existing(session, rid)
        assert existing is not None
        return _replay(existing, digest), False
    _, taken = await book.debit(
        acct,
        kind="redemption",
        points=applied,
        ref=f"redemption:{rid}",
        at=now,
        redemption_id=rid,
        order_id=redemption_in.order_id,
        data={"money": str(money), "check_amount": str(redemption_in.check_amount)},
        event_type="points.redeemed",
    )
    book.allocations[rid] = [
        Allocation(redemption_id=rid, lot_id=lot_id, points=pts, returned=Decimal(0), dirty=True)
        for lot_id, pts in taken
    ]
    await book.flush()
    state.balance_after = acct.balance
    return to_read(state), True


async def cancel(
    *, session: AsyncSession, programme: ProgrammeConfig, redemption_id: str, now: datetime
) -> RedemptionRead:
    """Cancel a redemption not yet settled by a purchase: its points go back to their lots. Idempotent."""
    existing = await _existing(session, redemption_id)
    if existing is None:
        raise RedemptionNotFound(f"no redemption {redemption_id!r}")
    book = Book(session, programme, now)
    acct = (await book.open([existing.customer_id], create=False))[existing.customer_id]
    await book.load_redemptions([redemption_id])  # re-read under the account lock
    red = book.redemptions[redemption_id]
    if red.status == "cancelled":
        return to_read(red)
    if red.status == "settled":
        raise RedemptionNotCancellable(
            f"redemption {redemption_id!r} was settled by order {red.order_id!r}; refund the order instead"
        )
    await book.return_redeemed(
        acct,
        red,
        red.points_applied - red.points_returned,
        ref=f"cancel:{redemption_id}",
        at=now,
        reason="cancelled",
    )
    red.status = "cancelled"
    red.cancelled_at = now
    red.dirty = True
    book.event(
        acct.customer_id,
        "redemption.cancelled",
        ref=redemption_id,
        at=now,
        points=red.points_applied,
        balance=acct.balance,
    )
    await book.flush()
    return to_read(red)
