"""Segments: definitions, membership evaluation (per batch and by sweep), dry runs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from segmentation.errors import SegmentKeyTaken, SegmentNotFound
from segmentation.repository import ProfileRepository, SegmentRepository
from segmentation.rules import compile_rule


async def evaluate_for_customers(*, session: AsyncSession, customer_ids: Sequence[str], now: datetime) -> dict[str, tuple[int, int]]:
    """Re-evaluate every segment for these customers in the caller's transaction (enter/exit + outbox)."""
    repo = SegmentRepository(session)
    out: dict[str, tuple[int, int]] = {}
    for seg in await repo.all_rules():
        compiled = compile_rule(seg["rule"])
        out[seg["key"]] = await repo.apply(
            segment_id=seg["id"], segment_key=seg["key"], rule_sql=compiled.sql, params=compiled.params, now=now, customer_ids=customer_ids
        )
    return out


async def sweep_segments(session: AsyncSession, now: datetime) -> dict[str, Any]:
    """Time-driven pass: refresh lifecycles, re-evaluate every segment for everyone, record sizes."""
    moved = await ProfileRepository(session).refresh_lifecycle(now=now)
    repo = SegmentRepository(session)
    changes = {}
    for seg in await repo.all_rules():
        compiled = compile_rule(seg["rule"])
        entered, exited = await repo.apply(
            segment_id=seg["id"], segment_key=seg["key"], rule_sql=compiled.sql, params=compiled.params, now=now, customer_ids=None
        )
        changes[seg["key"]] = {"entered": entered, "exited": exited}
    await repo.record_sizes(now=now)
    return {"lifecycle_changed": moved, "segments": changes}


async def sweep_rfm(session: AsyncSession, now: datetime) -> dict[str, Any]:
    """Refresh RFM quintiles and value tiers for everyone, then the segments that read them."""
    rescored = await ProfileRepository(session).refresh_rfm(now=now)
    result = await sweep_segments(session, now)
    return {"rescored": rescored, **result}


async def create_segment(*, session: AsyncSession, key: str, name: str, description: str | None, rule: Any, now: datetime,
                         builtin: bool = False, segment_id: str | None = None) -> dict[str, Any]:
    """Validate the rule, store the segment and fill it at once."""
    compiled = compile_rule(rule)
    repo = SegmentRepository(session)
    sid = segment_id or str(uuid.uuid4())
    if not await repo.insert(id=sid, key=key, name=name, description=description, rule_json=serde.dumps(rule).decode(), builtin=builtin, now=now):
        raise SegmentKeyTaken(f"a segment with key {key!r} exists", details={"key": key})
    await repo.apply(segment_id=sid, segment_key=key, rule_sql=compiled.sql, params=compiled.params, now=now, customer_ids=None)
    return await get_segment(session=session, id_or_key=sid)


async def get_segment(*, session: AsyncSession, id_or_key: str) -> dict[str, Any]:
    seg = await SegmentRepository(session).get(id_or_key)
    if seg is None:
        raise SegmentNotFound(f"no segment {id_or_key!r}", details={"segment": id_or_key})
    return seg


async def update_segment(*, session: AsyncSession, id_or_key: str, changes: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Change name, description or rule; a new rule re-evaluates everyone in this transaction."""
    seg = await get_segment(session=session, id_or_key=id_or_key)
    rule = changes.get("rule", seg["rule"])
    compiled = compile_rule(rule)
    repo = SegmentRepository(session)
    await repo.update(
        seg["id"],
        name=changes.get("name") or seg["name"],
        description=changes["description"] if "description" in changes else seg["description"],
        rule_json=serde.dumps(rule).decode(),
        now=now,
    )
    if "rule" in changes:
        await repo.apply(segment_id=seg["id"], segment_key=seg["key"], rule_sql=compiled.sql, params=compiled.params, now=now, customer_ids=None)
    return await get_segment(session=session, id_or_key=seg["id"])


async def delete_segment(*, session: AsyncSession, id_or_key: str, now: datetime) -> int:
    """Publish an exit for every member, then remove the segment; return how many exited."""
    seg = await get_segment(session=session, id_or_key=id_or_key)
    repo = SegmentRepository(session)
    exited = await repo.exit_all(segment_id=seg["id"], segment_key=seg["key"], now=now)
    await repo.delete(seg["id"])
    return exited


async def dry_run(*, session: AsyncSession, rule: Any, now: datetime, sample: int = 10) -> dict[str, Any]:
    """Count who would match a rule now, without storing anything."""
    compiled = compile_rule(rule)
    count, ids = await SegmentRepository(session).count_matching(rule_sql=compiled.sql, params=compiled.params, now=now, sample=sample)
    return {"count": count, "sample": ids, "uses_time": compiled.uses_time, "uses_purchases": compiled.uses_purchases}
