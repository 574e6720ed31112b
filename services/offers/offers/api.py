"""HTTP routes: validate, call the domain, return a response model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from crm_common.auth import CHANGES_NOTHING
from offers import campaigns as domain
from offers import decisions
from offers.coupons_api import router as coupons_router
from offers.deps import CacheDep, CampaignId, CampaignIdQuery, CustomerId, NowDep, PeersDep, SessionDep, SettingsDep
from offers.repository import OffersRepository
from offers.schemas import (
    CampaignDecisionPage,
    CampaignDefinition,
    CampaignPage,
    CampaignRead,
    CampaignUpdate,
    DecisionRead,
    DryRunRead,
    DryRunRequest,
    Outcome,
    VersionRead,
    WhyRead,
)

router = APIRouter(prefix="/v1", tags=["offers"])
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


@router.post(
    "/campaigns",
    status_code=201,
    response_model=CampaignRead,
    summary="Create a draft campaign",
    responses={422: {"description": "a field that can never work"}, 503: {"description": "peer down"}},
)
async def create_campaign(
    body: CampaignDefinition, session: SessionDep, peers: PeersDep, now: NowDep
) -> dict[str, Any]:
    return await domain.create_campaign(session=session, peers=peers, definition=body, now=now)


@router.get("/campaigns", response_model=CampaignPage, summary="List campaigns")
async def list_campaigns(
    session: SessionDep,
    state: Annotated[Literal["draft", "active", "paused", "ended"] | None, Query()] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    items, total = await OffersRepository(session).list_campaigns(state=state, limit=limit, offset=offset)
    return {"items": items, "total": total}


@router.post(
    "/campaigns/dry-run", response_model=DryRunRead, summary="Dry-run an unsaved definition", **CHANGES_NOTHING
)
async def dry_run_unsaved(
    body: DryRunRequest, session: SessionDep, peers: PeersDep, now: NowDep, settings: SettingsDep
) -> dict[str, Any]:
    await domain.check_definition(definition=body.definition, peers=peers, now=now)
    return await domain.dry_run(
        session=session, definition=body.definition, campaign_id=None, version=1, now=now, settings=settings
    )


@router.get("/campaigns/{campaign_id}", response_model=CampaignRead, summary="Read a campaign")
async def read_campaign(campaign_id: CampaignId, session: SessionDep) -> dict[str, Any]:
    return await domain.get_campaign(session=session, campaign_id=campaign_id)


@router.patch(
    "/campaigns/{campaign_id}",
    response_model=CampaignRead,
    summary="Edit sections of a campaign (an active one gets a new version)",
)
async def update_campaign(
    campaign_id: CampaignId, body: CampaignUpdate, session: SessionDep, peers: PeersDep, now: NowDep, cache: CacheDep
) -> dict[str, Any]:
    row = await domain.update_campaign(session=session, peers=peers, campaign_id=campaign_id, changes=body, now=now)
    cache.invalidate()
    return row


@router.get("/campaigns/{campaign_id}/versions", response_model=list[VersionRead], summary="Every version")
async def versions(campaign_id: CampaignId, session: SessionDep) -> list[dict[str, Any]]:
    await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await OffersRepository(session).versions(campaign_id)


async def _transition(action: str, campaign_id: str, session: Any, peers: Any, now: Any, cache: Any) -> dict[str, Any]:
    row = await domain.transition(session=session, peers=peers, campaign_id=campaign_id, action=action, now=now)
    cache.invalidate()
    return row


@router.post("/campaigns/{campaign_id}/activate", response_model=CampaignRead, summary="Draft to active")
async def activate(campaign_id: CampaignId, session: SessionDep, peers: PeersDep, now: NowDep, cache: CacheDep) -> Any:
    return await _transition("activate", campaign_id, session, peers, now, cache)


@router.post("/campaigns/{campaign_id}/pause", response_model=CampaignRead, summary="Active to paused")
async def pause(campaign_id: CampaignId, session: SessionDep, peers: PeersDep, now: NowDep, cache: CacheDep) -> Any:
    return await _transition("pause", campaign_id, session, peers, now, cache)


@router.post("/campaigns/{campaign_id}/resume", response_model=CampaignRead, summary="Paused to active")
async def resume(campaign_id: CampaignId, session: SessionDep, peers: PeersDep, now: NowDep, cache: CacheDep) -> Any:
    return await _transition("resume", campaign_id, session, peers, now, cache)


@router.post("/campaigns/{campaign_id}/end", response_model=CampaignRead, summary="End for good")
async def end(campaign_id: CampaignId, session: SessionDep, peers: PeersDep, now: NowDep, cache: CacheDep) -> Any:
    return await _transition("end", campaign_id, session, peers, now, cache)


@router.post(
    "/campaigns/{campaign_id}/dry-run",
    response_model=DryRunRead,
    summary="Dry-run a saved campaign now",
    **CHANGES_NOTHING,
)
async def dry_run_saved(
    campaign_id: CampaignId, session: SessionDep, now: NowDep, settings: SettingsDep
) -> dict[str, Any]:
    row = await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await domain.dry_run(
        session=session,
        definition=CampaignDefinition.model_validate(row["definition"]),
        campaign_id=row["id"],
        version=row["version"],
        now=now,
        settings=settings,
    )


@router.get("/campaigns/{campaign_id}/outcomes", summary="Decisions of a campaign counted by outcome")
async def outcomes(campaign_id: CampaignId, session: SessionDep) -> dict[str, int]:
    await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await OffersRepository(session).outcome_counts(campaign_id)


@router.get(
    "/campaigns/{campaign_id}/decisions",
    response_model=CampaignDecisionPage,
    summary="The campaign's decisions in the order they were made, page by page (its audience and arms)",
)
async def campaign_decisions(
    campaign_id: CampaignId,
    session: SessionDep,
    outcome: Annotated[Outcome | None, Query(description="only this outcome, e.g. requested or control")] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="the `next_after` of the last page")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> dict[str, Any]:
    await domain.get_campaign(session=session, campaign_id=campaign_id)
    rows = await OffersRepository(session).campaign_decisions(campaign_id, outcome=outcome, after=after, limit=limit)
    return {"items": rows, "next_after": rows[-1]["id"] if len(rows) == limit else None}


@router.get(
    "/campaigns/{campaign_id}/why/{customer_id}",
    response_model=WhyRead,
    summary="Why did or didn't this customer get this campaign",
)
async def why(campaign_id: CampaignId, customer_id: CustomerId, session: SessionDep) -> dict[str, Any]:
    campaign = await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await decisions.why(session=session, campaign=campaign, customer_id=customer_id)


@router.get(
    "/customers/{customer_id}/decisions",
    response_model=list[DecisionRead],
    summary="Every campaign decision about a customer, newest first",
)
async def customer_decisions(
    customer_id: CustomerId,
    session: SessionDep,
    campaign_id: CampaignIdQuery,
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    return await decisions.customer_decisions(
        session=session, customer_id=customer_id, campaign_id=campaign_id, limit=limit
    )


from offers.report_api import router as report_router  # noqa: E402 (the report's routes, under /v1)

router.include_router(report_router)
router.include_router(coupons_router)
