"""Memberships: compiled rules applied set-based, entries and exits logged and published.

All segments are applied in one statement (`membership_sql`): match, diff against memberships,
enter, exit, log, and write one `SegmentMembershipChanged` per change to the outbox, in the
caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.outbox import enqueue_select
from crm_common.settings import TOPIC_SEGMENTS
from segmentation import models
from segmentation.repository.profiles import disable_jit

# Consumers take this lock shared (they touch disjoint customers); sweeps and segment edits take
# it exclusively, so a full re-evaluation never races a batch on stale profiles.
MEMBERSHIP_LOCK = 0x5E6A11


@dataclass(slots=True, kw_only=True)
class SegmentRule:
    """A segment with its rule compiled (bind parameters prefixed per segment)."""

    id: str
    key: str
    sql: str
    params: dict[str, Any]


# The `profile` of a SegmentMembershipChanged (contract.messages.ProfileDigest), built in SQL.
DIGEST_SQL = """jsonb_strip_nulls(jsonb_build_object(
    'first_name', p.traits ->> 'first_name',
    'favourite_product', p.favourite_product,
    'favourite_category', p.favourite_category,
    'favourite_size', p.favourite_size,
    'favourite_color', p.favourite_color,
    'predicted_next_purchase', p.predicted_next_purchase,
    'value_tier', p.value_tier,
    'lifecycle', seg_lifecycle(p.orders, p.first_purchase_at, p.last_purchase_at, p.cadence_days, CAST(:now AS timestamptz)),
    'orders', p.orders,
    'revenue', p.revenue::text,
    'avg_check', p.avg_check::text,
    'discount_affinity', p.discount_affinity,
    'last_feedback_rating', p.last_feedback_rating,
    'last_feedback_topic', p.last_feedback_topic,
    'consents', p.consents))"""

# One SegmentMembershipChanged per logged change, as the JSON bytes the outbox stores; the
# contract test validates these rows against TOPIC_MODELS.
PUBLISH_SQL = """
SELECT CAST(:topic AS text) AS topic, l.customer_id AS key, convert_to(jsonb_build_object(
    'id', 'segchg:' || l.id,
    'type', 'segment.' || l.change,
    'customer_id', l.customer_id,
    'occurred_at', CAST(:now_iso AS text),
    'segment_id', l.segment_id,
    'segment_key', segs.skey,
    'profile', coalesce(d.profile, '{}'::jsonb))::text, 'UTF8') AS value
FROM logged l JOIN segs ON segs.sid = l.segment_id JOIN digest d ON d.customer_id = l.customer_id
"""

# Matches are compared per customer as bit masks, one bigint per chunk of this many segments.
MASK_BITS = 63


def _mask_chunks(count: int) -> list[range]:
    return [range(c, min(c + MASK_BITS, count)) for c in range(0, count, MASK_BITS)]


def membership_sql(count: int, *, restricted: bool) -> str:
    """The common table expressions that apply many segments' rules in one pass over profiles:
    diff against current memberships, enter, exit and log; PUBLISH_SQL reads them for the outbox.

    Each profile is read once and all rules are evaluated on it into bit masks (bit i of the
    masks is rule i); a customer's current memberships fold into the same masks, and only the
    customers whose masks differ are expanded back into (segment, customer) entries and exits.
    """
    only = "WHERE p.customer_id = ANY(CAST(:ids AS text[]))" if restricted else ""
    only_m = "WHERE m.customer_id = ANY(CAST(:ids AS text[]))" if restricted else ""
    chunks = _mask_chunks(count)
    matched = ", ".join(
        " | ".join(f"(CASE WHEN ({{rule{i}}}) THEN {1 << (i % MASK_BITS)}::bigint ELSE 0::bigint END)" for i in chunk)
        for chunk in chunks
    )
    member = ", ".join(
        f"coalesce(bit_or(1::bigint << segs.bit) FILTER (WHERE segs.chunk = {n + 1}), 0)" for n in range(len(chunks))
    )
    zeros = ", ".join("0" for _ in chunks)
    return f"""
segs AS (
    SELECT sid, skey, (k - 1)::int / {MASK_BITS} + 1 AS chunk, (k - 1)::int % {MASK_BITS} AS bit
    FROM unnest(CAST(:sids AS text[]), CAST(:skeys AS text[])) WITH ORDINALITY AS u(sid, skey, k)
),
matched AS (SELECT p.customer_id, ARRAY[{matched}] AS mask FROM profiles p {only}),
member AS (
    SELECT m.customer_id, ARRAY[{member}] AS mask
    FROM memberships m JOIN segs ON segs.sid = m.segment_id {only_m} GROUP BY m.customer_id
),
changed AS MATERIALIZED (
    SELECT customer_id, coalesce(n.mask, ARRAY[{zeros}]::bigint[]) AS now_mask,
           coalesce(w.mask, ARRAY[{zeros}]::bigint[]) AS was_mask
    FROM matched n FULL JOIN member w USING (customer_id)
    WHERE coalesce(n.mask, ARRAY[{zeros}]::bigint[]) <> coalesce(w.mask, ARRAY[{zeros}]::bigint[])
),
diff AS MATERIALIZED (
    SELECT segs.sid, c.customer_id, (c.now_mask[segs.chunk] >> segs.bit) & 1 = 1 AS entering
    FROM changed c CROSS JOIN segs
    WHERE ((c.now_mask[segs.chunk] # c.was_mask[segs.chunk]) >> segs.bit) & 1 = 1
),
entered AS (
    INSERT INTO memberships (segment_id, customer_id, entered_at)
    SELECT sid, customer_id, CAST(:now AS timestamptz) FROM diff WHERE entering
    ON CONFLICT DO NOTHING RETURNING segment_id, customer_id
),
exited AS (
    DELETE FROM memberships m USING diff d
    WHERE NOT d.entering AND m.segment_id = d.sid AND m.customer_id = d.customer_id
    RETURNING m.segment_id, m.customer_id
),
logged AS (
    INSERT INTO membership_log (segment_id, customer_id, change, at)
    SELECT segment_id, customer_id, change, CAST(:now AS timestamptz) FROM (
        SELECT segment_id, customer_id, 'entered' AS change FROM entered
        UNION ALL SELECT segment_id, customer_id, 'exited' FROM exited) ch
    RETURNING id, segment_id, customer_id, change
),
-- a customer's profile digest is built once, however many segments they entered or left
digest AS (
    SELECT c.customer_id, {DIGEST_SQL} AS profile
    FROM (SELECT DISTINCT customer_id FROM logged) c LEFT JOIN profiles p ON p.customer_id = c.customer_id
)
"""


_log = models.MembershipLogEntry


class MembershipRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, *, exclusive: bool) -> None:
        """Take the membership lock for this transaction (see MEMBERSHIP_LOCK)."""
        fn = func.pg_advisory_xact_lock if exclusive else func.pg_advisory_xact_lock_shared
        await self.session.execute(select(fn(MEMBERSHIP_LOCK)))
        await disable_jit(self.session)
        if exclusive:
            # A full pass hashes every membership against every match; keep that join in memory.
            await self.session.execute(text("SET LOCAL work_mem = '256MB'"))

    async def apply(self, rules: Sequence[SegmentRule], *, now: datetime, customer_ids: Sequence[str] | None) -> int:
        """Apply compiled rules to the given customers (or everyone); return how many entries and exits were published."""
        if not rules or (customer_ids is not None and not customer_ids):
            return 0
        bind: dict[str, Any] = {
            "sids": [r.id for r in rules],
            "skeys": [r.key for r in rules],
            "now": now,
            "now_iso": now.isoformat(),
            "topic": TOPIC_SEGMENTS,
        }
        # Rule SQL is generated by the compiler (literals are bound), so plain substitution is safe.
        ctes = membership_sql(len(rules), restricted=customer_ids is not None)
        for i, r in enumerate(rules):
            bind.update(r.params)
            ctes = ctes.replace("{" + f"rule{i}" + "}", r.sql, 1)
        if customer_ids is not None:
            bind["ids"] = list(customer_ids)
        return await enqueue_select(self.session, PUBLISH_SQL, bind, ctes=ctes)

    async def apply_to_everyone(self, rules: Sequence[SegmentRule], *, now: datetime) -> dict[str, dict[str, int]]:
        """Apply compiled rules to every profile; return entered/exited counts per segment key.

        The caller holds the lock exclusively, so every log row after the last one seen before
        the pass is this pass's: no other transaction can write one meanwhile.
        """
        out = {r.key: {"entered": 0, "exited": 0} for r in rules}
        since = (await self.session.execute(select(func.coalesce(func.max(_log.id), 0)))).scalar_one()
        if not await self.apply(rules, now=now, customer_ids=None):
            return out
        keys = {r.id: r.key for r in rules}
        # Filtered on (segment_id, at) as well, so its index serves the count even while the
        # table's statistics predate the rows a large pass just wrote.
        rows = await self.session.execute(
            select(_log.segment_id, _log.change, func.count().label("n"))
            .where(_log.segment_id.in_(list(keys)), _log.at == now, _log.id > since)
            .group_by(_log.segment_id, _log.change)
        )
        for row in rows:
            out[keys[row.segment_id]][row.change] = int(row.n)
        return out

    async def exit_all(self, *, segment_id: str, segment_key: str, now: datetime) -> int:
        """Everyone leaves (the segment is being deleted): log and publish the exits."""
        return await self.apply(
            [SegmentRule(id=segment_id, key=segment_key, sql="false", params={})], now=now, customer_ids=None
        )

    async def count_matching(
        self, *, rule_sql: str, params: dict[str, Any], now: datetime, sample: int
    ) -> tuple[int, list[str]]:
        """How many profiles a compiled rule matches now, and the first few of them."""
        bind = {**params, "now": now}
        total = (
            await self.session.execute(text(f"SELECT count(*) FROM profiles p WHERE {rule_sql}"), bind)
        ).scalar_one()
        rows = await self.session.execute(
            text(f"SELECT p.customer_id FROM profiles p WHERE {rule_sql} ORDER BY p.customer_id LIMIT :lim"),
            {**bind, "lim": sample},
        )
        return int(total), list(rows.scalars())
