"""Dependencies of the routes as Annotated aliases."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from crm_common.contract.types import Id
from crm_common.errors import InvalidInput
from crm_common.service import RuntimeDep, SessionDep
from fastapi import Depends, Path

from loyalty.ledger import load_programme
from loyalty.schemas import ProgrammeConfig


async def get_programme(session: SessionDep) -> ProgrammeConfig:
    return await load_programme(session)


def get_now(runtime: RuntimeDep) -> datetime:
    return runtime.clock.now()


def customer_path(customer_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
    if "\x00" in customer_id:
        raise InvalidInput(
            "customer_id must not contain NUL characters",
            details=[{"loc": ["path", "customer_id"]}],
        )
    return customer_id


def redemption_path(redemption_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
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
