"""HTTP routes of the loyalty service: validate, call the domain, return a response model."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from crm_common.errors import InvalidInput
from crm_common.http import PathId
from loyalty import accounts, adjustments, redemptions, reports
from loyalty.deps import NowDep, ProgrammeDep, SessionDep
from loyalty.errors import RedemptionNotFound
from loyalty.ledger import Book
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import (
    AccountRead,
    AdjustmentCreate,
    AdjustmentRead,
    LedgerPage,
    ProgrammeConfig,
    ProgrammeRead,
    ProgrammeReport,
    RedemptionCreate,
    RedemptionRead,
    ReferralRead,
)

router = APIRouter(prefix="/v1", tags=["loyalty"])
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "conflict (insufficient points, reused id with another body)"}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "not found"}}


@router.get("/programme", summary="The programme's rules")
async def get_programme(session: SessionDep, programme: ProgrammeDep) -> ProgrammeRead:
    row = await LoyaltyRepository(session).get_programme()
    return ProgrammeRead(config=programme, updated_at=row.updated_at if row else None)


@router.put("/programme", summary="Replace the programme's rules")
async def put_programme(config: ProgrammeConfig, session: SessionDep, now: NowDep, request: Request) -> ProgrammeRead:
    # Checked on the way in only: a programme stored before this rule must still load.
    if config.reminder_days >= config.expiry_days:
        raise InvalidInput(
            "reminder_days must be less than expiry_days (the reminder would be due when the points are earned)",
            details=[
                {"loc": ["body", "reminder_days"], "msg": f"{config.reminder_days} >= expiry_days {config.expiry_days}"}
            ],
        )
    await LoyaltyRepository(session).put_programme(config.model_dump(mode="json"), now)
    request.app.state.programme_cache.put(config)
    return ProgrammeRead(config=config, updated_at=now)


@router.get("/accounts/{customer_id}", summary="Balance, tier, lots with expiry, goals", responses=NOT_FOUND)
async def get_account(customer_id: PathId, session: SessionDep, now: NowDep) -> AccountRead:
    return await accounts.get_account(session=session, customer_id=customer_id, now=now)


@router.get(
    "/accounts/{customer_id}/ledger",
    summary="The account's ledger, newest first",
    responses=NOT_FOUND,
)
async def get_ledger(
    customer_id: PathId,
    session: SessionDep,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LedgerPage:
    return await accounts.get_ledger(session=session, customer_id=customer_id, before=before, limit=limit)


@router.get("/accounts/{customer_id}/referral", summary="The customer's referral code", responses=NOT_FOUND)
async def get_referral(customer_id: PathId, session: SessionDep) -> ReferralRead:
    return await accounts.get_referral(session=session, customer_id=customer_id)


@router.post(
    "/accounts/{customer_id}/adjustments",
    status_code=201,
    summary="Adjust points with a reason",
    responses={**CONFLICT, 200: {"description": "replay of an earlier identical adjustment"}},
)
async def post_adjustment(
    customer_id: PathId,
    body: AdjustmentCreate,
    session: SessionDep,
    programme: ProgrammeDep,
    now: NowDep,
    response: Response,
) -> AdjustmentRead:
    result, created = await adjustments.adjust(
        session=session, programme=programme, customer_id=customer_id, adjustment_in=body, now=now
    )
    if not created:
        response.status_code = 200
    return result


@router.post(
    "/redemptions",
    status_code=201,
    summary="Apply points to a check at the POS",
    responses={
        **CONFLICT,
        **NOT_FOUND,
        200: {"description": "replay of an earlier identical request"},
    },
)
async def post_redemption(
    body: RedemptionCreate,
    session: SessionDep,
    programme: ProgrammeDep,
    now: NowDep,
    response: Response,
) -> RedemptionRead:
    result, created = await redemptions.redeem(session=session, programme=programme, redemption_in=body, now=now)
    if not created:
        response.status_code = 200
    return result


@router.get("/redemptions/{redemption_id}", summary="One redemption", responses=NOT_FOUND)
async def get_redemption(
    redemption_id: PathId, session: SessionDep, programme: ProgrammeDep, now: NowDep
) -> RedemptionRead:
    book = Book(session, programme, now)
    await book.load_redemptions([redemption_id])
    if redemption_id not in book.redemptions:
        raise RedemptionNotFound(f"no redemption {redemption_id!r}")
    return redemptions.to_read(book.redemptions[redemption_id])


@router.post(
    "/redemptions/{redemption_id}/cancel",
    summary="Cancel a redemption not settled by a purchase",
    responses={**CONFLICT, **NOT_FOUND},
)
async def cancel_redemption(
    redemption_id: PathId, session: SessionDep, programme: ProgrammeDep, now: NowDep
) -> RedemptionRead:
    return await redemptions.cancel(session=session, programme=programme, redemption_id=redemption_id, now=now)


@router.get("/reports/points", summary="Points issued, redeemed, expired and liability by month; rates")
async def get_points_report(
    session: SessionDep,
    since: Annotated[date | None, Query(alias="from")] = None,
    until: Annotated[date | None, Query(alias="to")] = None,
) -> ProgrammeReport:
    if since is not None and until is not None and since > until:
        raise InvalidInput(
            "'from' is after 'to'",
            details=[{"loc": ["query", "from"], "msg": f"{since} is after to={until}"}],
        )
    return await reports.programme_report(session=session, since=since, until=until)
