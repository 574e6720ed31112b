"""Manual adjustments by an operator, with a reason; idempotent by adjustment_id."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.errors import IdempotencyConflict
from loyalty.ledger import Book
from loyalty.schemas import AdjustmentCreate, AdjustmentRead, ProgrammeConfig


async def adjust(
    *,
    session: AsyncSession,
    programme: ProgrammeConfig,
    customer_id: str,
    adjustment_in: AdjustmentCreate,
    now: datetime,
) -> tuple[AdjustmentRead, bool]:
    """Credit (new lot, netted against a points debt) or debit (oldest lots first, never below zero) an account;
    return (result, created)."""
    ref = f"adjustment:{adjustment_in.adjustment_id}"
    book = Book(session, programme, now)
    acct = (await book.open([customer_id], create=True, at=now))[customer_id]
    existing = await book.repo.ledger_by_ref(ref)
    if existing is not None:
        if (
            existing.customer_id != customer_id
            or existing.points != adjustment_in.points
            or existing.data.get("reason") != adjustment_in.reason
        ):
            raise IdempotencyConflict(f"adjustment {adjustment_in.adjustment_id!r} exists with a different request")
        balance_after = existing.balance_after
        # A credit netted against a points debt answered with the balance after its settlement: so does the replay.
        if (settled := await book.repo.ledger_by_ref(f"debt:{ref}")) is not None:
            balance_after = settled.balance_after
        return AdjustmentRead(
            adjustment_id=adjustment_in.adjustment_id,
            customer_id=existing.customer_id,
            points=existing.points,
            reason=existing.data["reason"],
            balance=balance_after,
            seq=existing.seq,
        ), False
    data = {"reason": adjustment_in.reason}
    if adjustment_in.points > 0:
        book.credit(
            acct,
            kind="adjustment",
            points=adjustment_in.points,
            ref=ref,
            at=now,
            data=data,
            event_type="points.adjusted",
        )
    else:
        await book.debit(
            acct,
            kind="adjustment",
            points=-adjustment_in.points,
            ref=ref,
            at=now,
            data=data,
            event_type="points.adjusted",
        )
    await book.flush()
    row = await book.repo.ledger_by_ref(ref)
    assert row is not None
    return AdjustmentRead(
        adjustment_id=adjustment_in.adjustment_id,
        customer_id=customer_id,
        points=adjustment_in.points,
        reason=adjustment_in.reason,
        balance=acct.balance,
        seq=row.seq,
    ), True
