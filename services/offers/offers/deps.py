"""Dependencies of the routes as Annotated aliases."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Depends, Path, Query, Request

from crm_common.errors import InvalidInput
from crm_common.service import RuntimeDep, SessionDep
from offers.evaluation import CampaignCache
from offers.peers import Peers
from offers.settings import Settings


async def get_now(runtime: RuntimeDep) -> datetime:
    return runtime.clock.now()


async def get_peers(request: Request) -> Peers:
    return request.app.state.peers  # type: ignore[no-any-return]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_cache(request: Request) -> CampaignCache:
    return request.app.state.campaign_cache  # type: ignore[no-any-return]


def _checked(value: str, name: str, where: str = "path") -> str:
    if "\x00" in value or value.isspace():
        raise InvalidInput(f"{name} must be 1-128 characters, not blank, without NUL", details=[{"loc": [where, name]}])
    return value


async def campaign_path(campaign_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
    return _checked(campaign_id, "campaign_id")


async def campaign_query(campaign_id: Annotated[str | None, Query(min_length=1, max_length=128)] = None) -> str | None:
    return None if campaign_id is None else _checked(campaign_id, "campaign_id", "query")


async def customer_path(customer_id: Annotated[str, Path(min_length=1, max_length=128)]) -> str:
    return _checked(customer_id, "customer_id")


NowDep = Annotated[datetime, Depends(get_now)]
PeersDep = Annotated[Peers, Depends(get_peers)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CacheDep = Annotated[CampaignCache, Depends(get_cache)]
CampaignId = Annotated[str, Depends(campaign_path)]
CustomerId = Annotated[str, Depends(customer_path)]
CampaignIdQuery = Annotated[str | None, Depends(campaign_query)]
__all__ = [
    "CacheDep",
    "CampaignId",
    "CampaignIdQuery",
    "CustomerId",
    "NowDep",
    "PeersDep",
    "RuntimeDep",
    "SessionDep",
    "SettingsDep",
]
