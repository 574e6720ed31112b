"""Dependencies of the routes as Annotated aliases."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

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


ProgrammeDep = Annotated[ProgrammeConfig, Depends(get_programme)]
NowDep = Annotated[datetime, Depends(get_now)]
__all__ = ["NowDep", "ProgrammeDep", "RuntimeDep", "SessionDep"]
