"""Every query of the ingest service: API keys, the archive insert, the publish queue, replay."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, cast, exists, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ingest.models import ApiKey, ArchivedEvent, PendingBatch

# One statement per batch: archive the new events, skip the ones seen before (same source and
# event_id, whatever their body), queue the new ones for the relay as one row, answer which were new.
_INSERT_BATCH = text(
    """
    WITH ins AS (
        INSERT INTO events (source, event_id, customer_key, type, occurred_at, received_at, message)
        SELECT :source, e.event_id, e.customer_key, e.type, e.occurred_at, :received_at, e.message
        FROM unnest(
            CAST(:event_ids AS text[]), CAST(:customer_keys AS text[]), CAST(:types AS text[]),
            CAST(:occurred AS timestamptz[]), CAST(:messages AS bytea[])
        ) WITH ORDINALITY AS e(event_id, customer_key, type, occurred_at, message, ord)
        ORDER BY e.ord
        ON CONFLICT (source, event_id) DO NOTHING
        RETURNING seq, event_id
    ), queued AS (
        INSERT INTO event_pending_batches (n, seqs)
        SELECT count(*), array_agg(seq ORDER BY seq) FROM ins HAVING count(*) > 0
        RETURNING id
    )
    SELECT event_id FROM ins
    -- Wakes the relay of whichever replica holds the relay lock, at commit (NULL row, skipped).
    UNION ALL SELECT NULL FROM queued CROSS JOIN LATERAL (SELECT pg_notify('crm_outbox', '')) n
    """
)

# A replay queues its events in rows of this many.
REPLAY_CHUNK = 1000

# One batch of the archive's retention: events received before :before that are not waiting to
# be published. No ORDER BY: the BRIN index on received_at finds the old block ranges without
# walking the whole primary key when (as usual) there is little or nothing to delete.
_DELETE_ARCHIVED_BATCH = text(
    """
    WITH pending AS MATERIALIZED (
        SELECT unnest(seqs) AS seq FROM event_pending_batches
    ), doomed AS (
        SELECT e.seq FROM events e
        WHERE e.received_at < :before AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.seq = e.seq)
        LIMIT :limit
    )
    DELETE FROM events WHERE seq IN (SELECT seq FROM doomed)
    """
)


async def delete_archived_batch(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` published events received before `before`; return how many."""
    result = await conn.execute(_DELETE_ARCHIVED_BATCH, {"before": before, "limit": limit})
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(slots=True)
class EventRow:
    event_id: str
    customer_key: str
    type: str
    occurred_at: datetime
    message: bytes


class EventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert_new(self, *, source: str, received_at: datetime, rows: Sequence[EventRow]) -> set[str]:
        """Archive and queue the events not seen before; return their event ids."""
        if not rows:
            return set()
        result = await self.session.execute(
            _INSERT_BATCH,
            {
                "source": source,
                "received_at": received_at,
                "event_ids": [r.event_id for r in rows],
                "customer_keys": [r.customer_key for r in rows],
                "types": [r.type for r in rows],
                "occurred": [r.occurred_at for r in rows],
                "messages": [r.message for r in rows],
            },
        )
        return {row[0] for row in result if row[0] is not None}

    async def get(self, *, source: str, event_id: str) -> tuple[ArchivedEvent, bool] | None:
        """One archived event and whether it is waiting to be published."""
        row = (
            await self.session.execute(
                select(ArchivedEvent).where(ArchivedEvent.source == source, ArchivedEvent.event_id == event_id)
            )
        ).scalar_one_or_none()
        if row is None:
            return None
        # The queue holds only what is waiting (normally a few rows), so scanning it is cheap.
        pending = (
            await self.session.execute(
                select(exists().where(PendingBatch.seqs.contains(cast([row.seq], ARRAY(BigInteger)))))
            )
        ).scalar_one()
        return row, bool(pending)

    async def queue_range(self, *, by: str, start: datetime, end: datetime, types: Sequence[str] | None) -> int:
        """Queue every archived event with `by` in [start, end) for publishing; return how many."""
        column = {"received_at": "received_at", "occurred_at": "occurred_at"}[by]
        result = await self.session.execute(
            text(
                f"""
                WITH matched AS (
                    SELECT seq FROM events
                    WHERE {column} >= :start AND {column} < :end
                      AND (CAST(:types AS text[]) IS NULL OR type = ANY(CAST(:types AS text[])))
                ), fresh AS (
                    -- Events still waiting from before are already queued: they go out once.
                    SELECT seq FROM matched EXCEPT SELECT unnest(seqs) FROM event_pending_batches
                ), queued AS (
                    INSERT INTO event_pending_batches (n, seqs)
                    SELECT count(*), array_agg(seq ORDER BY seq)
                    FROM (SELECT seq, (row_number() OVER (ORDER BY seq) - 1) / :chunk AS chunk FROM fresh) f
                    GROUP BY chunk ORDER BY chunk
                    RETURNING id
                )
                SELECT count(*),
                       (SELECT count(*) FROM queued CROSS JOIN LATERAL (SELECT pg_notify('crm_outbox', '')) n)
                FROM matched
                """
            ),
            {"start": start, "end": end, "types": list(types) if types else None, "chunk": REPLAY_CHUNK},
        )
        return int(result.scalar_one())


class KeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def by_hash(self, key_hash: str) -> ApiKey | None:
        return (
            await self.session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
        ).scalar_one_or_none()

    async def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        await self.session.flush()
        return key

    async def add_if_absent(self, key: ApiKey) -> None:
        """Insert unless a key with the same hash exists (revoked or not)."""
        await self.session.execute(
            text(
                "INSERT INTO api_keys (id, name, key_hash, source, scopes, rate_limit_per_s) "
                "VALUES (:id, :name, :key_hash, :source, CAST(:scopes AS varchar[]), :rate) "
                "ON CONFLICT (key_hash) DO NOTHING"
            ),
            {
                "id": key.id,
                "name": key.name,
                "key_hash": key.key_hash,
                "source": key.source,
                "scopes": key.scopes,
                "rate": key.rate_limit_per_s,
            },
        )

    async def list_all(self) -> Sequence[ApiKey]:
        return (await self.session.execute(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))).scalars().all()

    async def revoke(self, key_id: uuid.UUID, *, now: datetime) -> ApiKey | None:
        """Mark a key revoked (idempotent: a revoked key keeps its first revocation time)."""
        key = await self.session.get(ApiKey, key_id)
        if key is None:
            return None
        if key.revoked_at is None:
            await self.session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=now))
            await self.session.refresh(key)
        return key
