"""The archive's publish queue: what the common outbox relay reads to publish accepted events.

Ingest's relay is the runtime's `OutboxRelay` pointed at this queue instead of an `outbox`
table: the archive (`events`) is ingest's outbox, and `event_pending_batches` lists, per request,
the archived events still to publish. One relay at a time per database (advisory lock), in `seq`
order, keyed by customer_id (or `anon:<anonymous_id>`); the value is the stored EventMessage,
whose `id` is `<source>:<event_id>`, so a replay or a crash between send and ack is deduplicated
downstream.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.outbox import OutboxQueue
from crm_common.settings import TOPIC_EVENTS


class EventArchiveQueue(OutboxQueue):
    """The oldest queued request batches holding up to `limit` events (at least one batch)."""

    batches_sql = (
        "SELECT id FROM (SELECT id, sum(n) OVER (ORDER BY id) - n AS before"
        " FROM (SELECT id, n FROM event_pending_batches ORDER BY id LIMIT :limit) head) b"
        " WHERE before < :limit ORDER BY id"
    )
    fetch_sql = (
        "SELECT e.customer_key, e.message FROM event_pending_batches b"
        " CROSS JOIN LATERAL unnest(b.seqs) AS p(seq) JOIN events e ON e.seq = p.seq"
        " WHERE b.id = ANY(CAST(:ids AS bigint[])) ORDER BY p.seq"
    )
    # The archive itself is what a replay re-sends: a published batch's list is simply deleted.
    republishable = False
    ack_sql = delete_sql = "DELETE FROM event_pending_batches WHERE id = ANY(CAST(:ids AS bigint[]))"
    backlog_sql = "SELECT coalesce(sum(n), 0) FROM event_pending_batches"

    async def fetch(self, session: AsyncSession, limit: int) -> tuple[Any, list[tuple[str, str, bytes]]]:
        ids = (await session.execute(text(self.batches_sql), {"limit": limit})).scalars().all()
        if not ids:
            return ids, []
        rows = (await session.execute(text(self.fetch_sql), {"ids": ids})).all()
        return ids, [(TOPIC_EVENTS, r.customer_key, bytes(r.message)) for r in rows]
