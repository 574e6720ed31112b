"""Segments: definitions, membership evaluation (per batch and by sweep), dry runs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from segmentation.errors import SegmentKeyTaken, SegmentNotFound
from segmentation.repository.membership import MembershipRepository, SegmentRule
from segmentation.repository.profiles import ProfileRepository
from segmentation.repository.segments import SegmentRepository
from segmentation.rules import compile_rule


def _compiled(
    segments: Sequence[dict[str, Any]], *, time_only: bool = False, set_based: bool = False
) -> list[SegmentRule]:
    rules = []
    for i, seg in enumerate(segments):
        compiled = compile_rule(seg["rule"], prefix=f"s{i}_", set_based=set_based)
        if time_only and not compiled.uses_time:
            continue
        rules.append(SegmentRule(id=seg["id"], key=seg["key"], sql=compiled.sql, params=compiled.params))
    return rules


async def evaluate_for_customers(*, session: AsyncSession, customer_ids: Sequence[str], now: datetime) -> int:
    """Re-evaluate every segment for these customers in the caller's transaction; return how many entries and exits."""
    rules = _compiled(await SegmentRepository(session).all_rules())
    return await MembershipRepository(session).apply(rules, now=now, customer_ids=customer_ids)


async def begin_batch(*, session: AsyncSession) -> None:
    """Take the membership lock shared, first thing in a consumer transaction.

    Sweeps take it exclusively before touching profiles; taking it here before any row lock keeps
    the two from deadlocking (a batch waits for a running sweep, never the other way round).
    """
    await MembershipRepository(session).lock(exclusive=False)


async def recompute_all(*, session: AsyncSession, now: datetime, time_only: bool = False) -> dict[str, Any]:
    """Refresh lifecycles and re-evaluate segments for everyone in one pass; record sizes."""
    memberships, segments = MembershipRepository(session), SegmentRepository(session)
    await memberships.lock(exclusive=True)
    moved = await ProfileRepository(session).refresh_lifecycle(now=now)
    rules = _compiled(await segments.all_rules(), time_only=time_only, set_based=True)
    changes = await memberships.apply_to_everyone(rules, now=now)
    await segments.record_sizes(now=now)
    return {"lifecycle_changed": moved, "segments": changes}


async def sweep_segments(session: AsyncSession, now: datetime) -> dict[str, Any]:
    """Time-driven pass: only rules that read the clock can change without an event."""
    return await recompute_all(session=session, now=now, time_only=True)


async def sweep_rfm(session: AsyncSession, now: datetime) -> dict[str, Any]:
    """Refresh RFM quintiles and value tiers for everyone, then every segment."""
    await MembershipRepository(session).lock(exclusive=True)
    rescored = await ProfileRepository(session).refresh_rfm(now=now)
    result = await recompute_all(session=session, now=now)
    return {"rescored": rescored, **result}


async def create_segment(
    *,
    session: AsyncSession,
    key: str,
    name: str,
    description: str | None,
    rule: Any,
    now: datetime,
    builtin: bool = False,
    segment_id: str | None = None,
) -> dict[str, Any]:
    """Validate the rule, store the segment and fill it at once."""
    compiled = compile_rule(rule, set_based=True)
    repo = SegmentRepository(session)
    sid = segment_id or str(uuid.uuid4())
    if not await repo.insert(
        id=sid,
        key=key,
        name=name,
        description=description,
        rule=rule,
        builtin=builtin,
        now=now,
    ):
        raise SegmentKeyTaken(f"a segment with key {key!r} exists", details={"key": key})
    memberships = MembershipRepository(session)
    await memberships.lock(exclusive=True)
    await memberships.apply(
        [SegmentRule(id=sid, key=key, sql=compiled.sql, params=compiled.params)], now=now, customer_ids=None
    )
    return await get_segment(session=session, id_or_key=sid)


async def get_segment(*, session: AsyncSession, id_or_key: str) -> dict[str, Any]:
    seg = await SegmentRepository(session).get(id_or_key)
    if seg is None:
        raise SegmentNotFound(f"no segment {id_or_key!r}", details={"segment": id_or_key})
    return seg


async def update_segment(
    *, session: AsyncSession, id_or_key: str, changes: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """Change name, description or rule; a new rule re-evaluates everyone in this transaction."""
    seg = await get_segment(session=session, id_or_key=id_or_key)
    rule = changes.get("rule", seg["rule"])
    name = changes.get("name") or seg["name"]
    description = changes["description"] if "description" in changes else seg["description"]
    if (name, description, rule) == (seg["name"], seg["description"], seg["rule"]):
        return seg  # an empty or same-valued change changes nothing, not even the version
    compiled = compile_rule(rule, set_based=True)
    await SegmentRepository(session).update(seg["id"], name=name, description=description, rule=rule, now=now)
    if rule != seg["rule"]:
        memberships = MembershipRepository(session)
        await memberships.lock(exclusive=True)
        await memberships.apply(
            [SegmentRule(id=seg["id"], key=seg["key"], sql=compiled.sql, params=compiled.params)],
            now=now,
            customer_ids=None,
        )
    return await get_segment(session=session, id_or_key=seg["id"])


async def delete_segment(*, session: AsyncSession, id_or_key: str, now: datetime) -> int:
    """Publish an exit for every member, then remove the segment; return how many exited."""
    seg = await get_segment(session=session, id_or_key=id_or_key)
    memberships = MembershipRepository(session)
    await memberships.lock(exclusive=True)
    exited = await memberships.exit_all(segment_id=seg["id"], segment_key=seg["key"], now=now)
    await SegmentRepository(session).delete(seg["id"])
    return exited


async def dry_run(*, session: AsyncSession, rule: Any, now: datetime, sample: int = 10) -> dict[str, Any]:
    """Count who would match a rule now, without storing anything."""
    compiled = compile_rule(rule, set_based=True)
    count, ids = await MembershipRepository(session).count_matching(
        rule_sql=compiled.sql, params=compiled.params, now=now, sample=sample
    )
    return {
        "count": count,
        "sample": ids,
        "uses_time": compiled.uses_time,
        "uses_purchases": compiled.uses_purchases,
    }
