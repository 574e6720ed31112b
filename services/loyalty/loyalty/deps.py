"""Dependencies of the routes as Annotated aliases."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.types import Id
from crm_common.errors import InvalidInput
from crm_common.service import RuntimeDep, SessionDep
from loyalty.ledger import load_programme
from loyalty.schemas import ProgrammeConfig


class ProgrammeCache:
    """The programme's rules, re-read at most every `ttl` seconds: replicas see a change within that time."""

    def __init__(self, ttl: float = 2.0) -> None:
        self.ttl = ttl
        self.value: ProgrammeConfig | None = None
        self.loaded_at = 0.0

    async def get(self, session: AsyncSession) -> ProgrammeConfig:
        if self.value is None or time.monotonic() - self.loaded_at > self.ttl:
            self.value = await load_programme(session)
            self.loaded_at = time.monotonic()
        return self.value

    def put(self, value: ProgrammeConfig) -> None:
        """Use rules just written by this process (the database has them once the request commits)."""
        self.value = value
        self.loaded_at = time.monotonic()


async def get_programme(request: Request, session: SessionDep) -> ProgrammeConfig:
    return await request.app.state.programme_cache.get(session)  # type: ignore[no-any-return]


async def get_now(runtime: RuntimeDep) -> datetime:
    # async: a plain def dependency costs a thread-pool hop per request
    return runtime.clock.now()


async def customer_path(customer_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
    if "\x00" in customer_id:
        raise InvalidInput(
            "customer_id must not contain NUL characters",
            details=[{"loc": ["path", "customer_id"]}],
        )
    return customer_id


async def redemption_path(redemption_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
    if "\x00" in redemption_id:
        raise InvalidInput(
            "redemption_id must not contain NUL characters",
            details=[{"loc": ["path", "redemption_id"]}],
        )
    return redemption_id


ProgrammeDep = Annotated[ProgrammeConfig, Depends(get_programme)]
NowDep = Annotated[datetime, Depends(get_now)]
CustomerId = Annotated[Id, Depends(customer_path)]
RedemptionId = Annotated[str, Depends(redemption_path)]
__all__ = ["CustomerId", "NowDep", "ProgrammeDep", "RedemptionId", "RuntimeDep", "SessionDep"]
