"""Coupon routes for the POS: validate, redeem (idempotent by order), roll back, read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from crm_common.auth import CHANGES_NOTHING
from crm_common.errors import InvalidInput
from offers import codes, coupons
from offers.deps import CustomerId, NowDep, SessionDep, SettingsDep
from offers.schemas import (
    CouponRead,
    CouponSummary,
    RedeemRequest,
    RedemptionRead,
    RollbackRequest,
    ValidateRead,
    ValidateRequest,
)

router = APIRouter(tags=["coupons"])

_REFUSALS: dict[int | str, dict[str, Any]] = {
    409: {
        "description": "the coupon cannot be redeemed: `error.code` (and `error.details.reason`) is one of "
        "other_customer, expired, not_yet_valid, used, customer_limit, minimum_basket, minimum_quantity, "
        "not_applicable"
    },
    404: {"description": "`unknown_code`: no such coupon"},
    422: {"description": "a malformed code or basket: `error.details[].loc` names the field"},
}


async def code_path(code: Annotated[str, Path(min_length=1, max_length=codes.MAX_CODE_LENGTH + 8)]) -> str:
    value = codes.normalise(code)
    if value is None:
        raise InvalidInput(
            f"code must be a coupon code: 1-{codes.MAX_CODE_LENGTH} characters of A-Z, 0-9 and '-'",
            details=[{"loc": ["path", "code"], "msg": "not a coupon code", "type": "value_error"}],
        )
    return value


Code = Annotated[str, Depends(code_path)]


@router.post(
    "/coupons/validate",
    response_model=ValidateRead,
    summary="Would this coupon apply to this basket now, and what would it give (nothing is written)",
    responses={404: _REFUSALS[404], 422: _REFUSALS[422]},
    **CHANGES_NOTHING,
)
async def validate(body: ValidateRequest, session: SessionDep, now: NowDep, settings: SettingsDep) -> dict[str, Any]:
    return await coupons.validate(
        session,
        code=body.code,
        customer_id=body.customer_id,
        lines=coupons.lines_of(body.lines),
        order_total=body.order_total,
        now=now,
        delivery_cost=settings.delivery_cost,
    )


@router.post(
    "/coupons/redeem",
    response_model=RedemptionRead,
    summary="Redeem a coupon for an order (the same order again answers the same result)",
    responses=_REFUSALS,
)
async def redeem(body: RedeemRequest, session: SessionDep, now: NowDep, settings: SettingsDep) -> dict[str, Any]:
    return await coupons.redeem(
        session,
        code=body.code,
        customer_id=body.customer_id,
        order_id=body.order_id,
        lines=coupons.lines_of(body.lines),
        order_total=body.order_total,
        at=now,
        source="api",
        delivery_cost=settings.delivery_cost,
    )


@router.post(
    "/coupons/{code}/rollback",
    response_model=RedemptionRead,
    summary="Roll back an order's redemption of the coupon (idempotent); the use is given back",
    responses={404: {"description": "`unknown_code`, or `redemption_not_found` for this order"}},
)
async def rollback(code: Code, body: RollbackRequest, session: SessionDep, now: NowDep) -> dict[str, Any]:
    return await coupons.rollback(session, code=code, order_id=body.order_id, now=now)


@router.get(
    "/coupons/{code}",
    response_model=CouponRead,
    summary="A coupon: what it gives, its state, uses, validity and redemptions",
    responses={404: _REFUSALS[404]},
)
async def read_coupon(code: Code, session: SessionDep, now: NowDep) -> dict[str, Any]:
    return await coupons.get(session, code, now)


@router.get(
    "/customers/{customer_id}/coupons",
    response_model=list[CouponSummary],
    summary="A customer's coupons, newest first",
)
async def customer_coupons(
    customer_id: CustomerId, session: SessionDep, now: NowDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[dict[str, Any]]:
    return await coupons.of_customer(session, customer_id, now, limit)
