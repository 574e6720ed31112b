"""HTTP routes of the segmentation ops API: thin, they validate and call the domain."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from crm_common.auth import CHANGES_NOTHING
from crm_common.contract.types import Id
from crm_common.http import PathId
from segmentation import segments as seg_domain
from segmentation.deps import RuntimeDep, SessionDep
from segmentation.errors import ProfileNotFound
from segmentation.repository import ProfileRepository, ReportRepository, SegmentRepository
from segmentation.rules import describe_attributes
from segmentation.schemas import (
    DryRunRequest,
    DryRunResult,
    MemberPage,
    ProfileRead,
    SegmentCreate,
    SegmentRead,
    SegmentUpdate,
    SizePoint,
)

router = APIRouter(prefix="/v1", tags=["segmentation"])


@router.get(
    "/profiles/{customer_id}",
    response_model=ProfileRead,
    summary="A customer's profile, computed features and segments",
)
async def get_profile(customer_id: PathId, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    repo = ProfileRepository(session)
    profile = await repo.get(customer_id, now=runtime.clock.now())
    if profile is None:
        raise ProfileNotFound(f"no profile for customer {customer_id!r}")
    profile["segments"] = await repo.segments_of(customer_id)
    return profile


@router.get("/segments/attributes", summary="Attributes, operators and values a rule can use")
async def rule_attributes() -> list[dict[str, Any]]:
    return describe_attributes()


@router.get("/segments", response_model=list[SegmentRead], summary="All segments with their current size")
async def list_segments(session: SessionDep) -> list[dict[str, Any]]:
    return await SegmentRepository(session).list()


@router.post(
    "/segments",
    response_model=SegmentRead,
    status_code=201,
    summary="Create a segment; it fills at once",
)
async def create_segment(body: SegmentCreate, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await seg_domain.create_segment(
        session=session,
        key=body.key,
        name=body.name,
        description=body.description,
        rule=body.rule,
        now=runtime.clock.now(),
    )


@router.post(
    "/segments/dry-run",
    response_model=DryRunResult,
    summary="How many customers a rule matches now",
    **CHANGES_NOTHING,
)
async def dry_run(body: DryRunRequest, session: SessionDep, runtime: RuntimeDep) -> dict[str, Any]:
    return await seg_domain.dry_run(session=session, rule=body.rule, now=runtime.clock.now(), sample=body.sample)


@router.get("/segments/{segment}", response_model=SegmentRead, summary="One segment by id or key")
async def get_segment(segment: PathId, session: SessionDep) -> dict[str, Any]:
    return await seg_domain.get_segment(session=session, id_or_key=segment)


@router.patch(
    "/segments/{segment}",
    response_model=SegmentRead,
    summary="Edit a segment (a new rule re-evaluates everyone)",
)
async def update_segment(
    segment: PathId, body: SegmentUpdate, session: SessionDep, runtime: RuntimeDep
) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    if "rule" in changes and changes["rule"] is None:
        del changes["rule"]
    return await seg_domain.update_segment(
        session=session,
        id_or_key=segment,
        changes=changes,
        now=runtime.clock.now(),
    )


@router.delete(
    "/segments/{segment}",
    status_code=204,
    summary="Delete a segment; every member is published as exited",
)
async def delete_segment(segment: PathId, session: SessionDep, runtime: RuntimeDep) -> Response:
    await seg_domain.delete_segment(session=session, id_or_key=segment, now=runtime.clock.now())
    return Response(status_code=204)


@router.get(
    "/segments/{segment}/members",
    response_model=MemberPage,
    summary="Members, paginated by customer id",
)
async def members(
    segment: PathId,
    session: SessionDep,
    cursor: Id | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    seg = await seg_domain.get_segment(session=session, id_or_key=segment)
    items = await SegmentRepository(session).members(seg["id"], after=cursor, limit=limit)
    return {
        "items": items,
        "next_cursor": items[-1]["customer_id"] if len(items) == limit else None,
    }


@router.get(
    "/segments/{segment}/sizes",
    response_model=list[SizePoint],
    summary="Size history (one point per sweep)",
)
async def size_history(
    segment: PathId, session: SessionDep, limit: Annotated[int, Query(ge=1, le=10000)] = 500
) -> list[dict[str, Any]]:
    seg = await seg_domain.get_segment(session=session, id_or_key=segment)
    return await SegmentRepository(session).size_history(seg["id"], limit=limit)


@router.get("/reports/pareto", summary="Share of revenue by top customer percentile")
async def pareto(session: SessionDep) -> dict[str, Any]:
    return await ReportRepository(session).pareto()


@router.get("/reports/rfm", summary="RFM grid (recency x frequency) and named RFM groups")
async def rfm(session: SessionDep) -> dict[str, Any]:
    return await ReportRepository(session).rfm_grid()


@router.get("/reports/acquisition", summary="Revenue and retention by acquisition channel")
async def acquisition(session: SessionDep, runtime: RuntimeDep) -> list[dict[str, Any]]:
    return await ReportRepository(session).by_acquisition_channel(now=runtime.clock.now())
