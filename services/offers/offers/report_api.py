"""Routes of the campaign report and the back-test (included by offers.api under /v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from crm_common.auth import CHANGES_NOTHING
from offers import backtest as bt
from offers import campaigns as domain
from offers import report
from offers.deps import CampaignId, SessionDep, SettingsDep

router = APIRouter(tags=["offers"])


@router.get(
    "/campaigns/{campaign_id}/report",
    response_model=report.ReportRead,
    summary="What the campaign reached and earned against its control (incremental revenue, ROI)",
    responses={404: {"description": "unknown campaign"}, 422: {"description": "a bad query parameter"}},
)
async def campaign_report(
    campaign_id: CampaignId,
    session: SessionDep,
    settings: SettingsDep,
    cuped: Annotated[bool, Query(description="adjust revenue by each member's pre-period revenue")] = False,
    cap_percentile: Annotated[
        float | None, Query(ge=50, le=100, description="cap revenue per arm at this percentile (100: no cap)")
    ] = None,
    margin_rate: Annotated[
        float | None, Query(ge=0, le=1, description="margin per unit of revenue (default the service's)")
    ] = None,
) -> dict[str, Any]:
    campaign = await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await report.campaign_report(
        session=session,
        campaign=campaign,
        settings=settings,
        cuped=cuped,
        cap_percentile=cap_percentile,
        margin_rate=margin_rate,
    )


@router.post(
    "/campaigns/{campaign_id}/backtest",
    response_model=bt.BacktestRead,
    summary="Evaluate the campaign over stored history: who it would have reached and what they bought",
    responses={
        404: {"description": "unknown campaign"},
        422: {"description": "bad period or a trigger it cannot replay"},
    },
    **CHANGES_NOTHING,
)
async def backtest(
    campaign_id: CampaignId, body: bt.BacktestRequest, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    campaign = await domain.get_campaign(session=session, campaign_id=campaign_id)
    return await bt.backtest(session=session, campaign=campaign, request=body, settings=settings)
