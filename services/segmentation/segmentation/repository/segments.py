"""Segment definitions, their members and their size history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from segmentation import models

# A method named `list` shadows the builtin inside the class, so annotations use this alias.
Rows = list[dict[str, Any]]

_segment = models.Segment
_membership = models.Membership
_size = models.SegmentSize
# Every column of a segment, and its current size.
_WITH_SIZE = select(
    *_segment.__table__.columns,
    select(func.count())
    .select_from(_membership)
    .where(_membership.segment_id == _segment.id)
    .scalar_subquery()
    .label("size"),
)


class SegmentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list(self) -> Rows:
        rows = await self.session.execute(_WITH_SIZE.order_by(_segment.key))
        return [dict(r) for r in rows.mappings()]

    async def all_rules(self) -> Rows:
        rows = await self.session.execute(select(_segment.id, _segment.key, _segment.rule).order_by(_segment.key))
        return [dict(r) for r in rows.mappings()]

    async def get(self, id_or_key: str) -> dict[str, Any] | None:
        row = (
            (
                await self.session.execute(
                    _WITH_SIZE.where(or_(_segment.id == id_or_key, _segment.key == id_or_key)).limit(1)
                )
            )
            .mappings()
            .first()
        )
        return dict(row) if row else None

    async def insert(
        self,
        *,
        id: str,
        key: str,
        name: str,
        description: str | None,
        rule: Any,
        builtin: bool,
        now: datetime,
    ) -> bool:
        """Insert a segment; False if the key is taken."""
        result = await self.session.execute(
            insert(_segment)
            .values(
                id=id,
                key=key,
                name=name,
                description=description,
                rule=rule,
                builtin=builtin,
                version=1,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
            .returning(_segment.id)
        )
        return result.first() is not None

    async def update(self, segment_id: str, *, name: str, description: str | None, rule: Any, now: datetime) -> None:
        await self.session.execute(
            update(_segment)
            .where(_segment.id == segment_id)
            .values(name=name, description=description, rule=rule, version=_segment.version + 1, updated_at=now)
        )

    async def delete(self, segment_id: str) -> None:
        await self.session.execute(delete(_segment).where(_segment.id == segment_id))

    async def members(self, segment_id: str, *, after: str | None, limit: int) -> Rows:
        """Members by customer id, the page after `after`."""
        query = select(_membership.customer_id, _membership.entered_at).where(_membership.segment_id == segment_id)
        if after is not None:
            query = query.where(_membership.customer_id > after)
        rows = await self.session.execute(query.order_by(_membership.customer_id).limit(limit))
        return [dict(r) for r in rows.mappings()]

    async def record_sizes(self, *, now: datetime) -> None:
        """Note every segment's size as of `now`."""
        counts = select(_membership.segment_id, func.count().label("n")).group_by(_membership.segment_id).subquery()
        sizes = select(
            _segment.id, bindparam("now", now, type_=DateTime(timezone=True)), func.coalesce(counts.c.n, 0)
        ).outerjoin(counts, counts.c.segment_id == _segment.id)
        statement = insert(_size).from_select([_size.segment_id, _size.at, _size.size], sizes)
        await self.session.execute(
            statement.on_conflict_do_update(
                index_elements=[_size.segment_id, _size.at], set_={"size": statement.excluded.size}
            )
        )

    async def size_history(self, segment_id: str, *, limit: int) -> Rows:
        rows = await self.session.execute(
            select(_size.at, _size.size).where(_size.segment_id == segment_id).order_by(_size.at.desc()).limit(limit)
        )
        return [dict(r) for r in rows.mappings()]
