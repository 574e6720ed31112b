from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common.db import create_engine, create_sessionmaker
from loyalty.accrual import apply_events
from loyalty.ledger import load_programme
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig

from .factories import messages
from .invariants import check_points_debt


@pytest_asyncio.fixture(loop_scope="session")
async def db(make_database: Callable[..., Any]) -> AsyncIterator[tuple[str, async_sessionmaker[AsyncSession]]]:
    """A fresh migrated loyalty database and a sessionmaker on it."""
    url = await make_database("loyalty")
    engine = create_engine(url, pool_size=5)
    yield url, create_sessionmaker(engine)
    await engine.dispose()


async def set_programme(sm: async_sessionmaker[AsyncSession], config: dict[str, Any], now: datetime) -> ProgrammeConfig:
    programme = ProgrammeConfig.model_validate(config)
    async with sm() as s:
        await LoyaltyRepository(s).put_programme(programme.model_dump(mode="json"), now)
        await s.commit()
    return programme


async def apply(sm: async_sessionmaker[AsyncSession], now: datetime, *events: dict[str, Any]) -> None:
    """Apply events as the consumer does, in one transaction."""
    async with sm() as s:
        await apply_events(session=s, events=messages(*events), programme=await load_programme(s), now=now)
        await s.commit()


async def balance(sm: async_sessionmaker[AsyncSession], customer_id: str) -> Decimal | None:
    async with sm() as s:
        return (
            await s.execute(text("SELECT balance FROM accounts WHERE customer_id = :c"), {"c": customer_id})
        ).scalar()


async def ledger(sm: async_sessionmaker[AsyncSession], customer_id: str) -> list[tuple[str, Decimal, str]]:
    async with sm() as s:
        rows = await s.execute(
            text("SELECT kind, points, ref FROM ledger WHERE customer_id = :c ORDER BY seq"), {"c": customer_id}
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


async def outbox(sm: async_sessionmaker[AsyncSession], topic: str) -> list[dict[str, Any]]:
    from crm_common import serde

    async with sm() as s:
        rows = await s.execute(text("SELECT value FROM outbox WHERE topic = :t ORDER BY id"), {"t": topic})
        return [serde.loads(bytes(r[0])) for r in rows]


async def check_invariants(sm: async_sessionmaker[AsyncSession], customer_id: str) -> Decimal:
    """Balance == ledger sum == open lots; nothing negative; lots within bounds. Returns the balance."""
    async with sm() as s:
        row = (
            await s.execute(
                text(
                    "SELECT a.balance, "
                    "(SELECT coalesce(sum(points), 0) FROM ledger WHERE customer_id = a.customer_id), "
                    "(SELECT coalesce(sum(remaining), 0) FROM lots WHERE customer_id = a.customer_id), "
                    "(SELECT count(*) FROM lots WHERE customer_id = a.customer_id "
                    "   AND (remaining < 0 OR remaining > points)), "
                    "(SELECT count(*) FROM ledger WHERE customer_id = a.customer_id AND balance_after < 0) "
                    "FROM accounts a WHERE a.customer_id = :c"
                ),
                {"c": customer_id},
            )
        ).one()
    bal, ledger_sum, lots_sum, bad_lots, negative_after = row
    assert bal >= 0, f"negative balance {bal}"
    assert bal == ledger_sum, f"balance {bal} != ledger sum {ledger_sum}"
    assert bal == lots_sum, f"balance {bal} != lots remaining {lots_sum}"
    assert bad_lots == 0 and negative_after == 0
    await check_points_debt(sm, customer_id)
    await check_monthly_spend(sm, customer_id)
    return bal


async def check_monthly_spend(sm: async_sessionmaker[AsyncSession], customer_id: str) -> None:
    """spend_months holds, per UTC month, exactly the customer's paid - refunded over purchases of that month."""
    async with sm() as s:
        rows = await s.execute(
            text(
                "SELECT coalesce(p.month, m.month), p.spend, m.spend FROM (SELECT CAST(date_trunc('month', "
                "occurred_at AT TIME ZONE 'UTC') AS date) AS month, sum(paid - refunded) AS spend FROM purchases "
                "WHERE customer_id = :c GROUP BY 1) p FULL JOIN (SELECT month, spend FROM spend_months "
                "WHERE customer_id = :c) m ON m.month = p.month"
            ),
            {"c": customer_id},
        )
        for month, from_purchases, kept in rows:
            assert (from_purchases or 0) == (kept or 0), f"{month}: purchases {from_purchases}, spend_months {kept}"
