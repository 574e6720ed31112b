"""Every statement of the loyalty service: every write of the ledger, the lots and the outbox lives here.

Rows are read by column name into the dataclasses of `loyalty.state` (their `COLUMNS` are what is selected) or
into the API's read models, and written back by the same names; the domain modules call these methods and hold
no SQL. Bulk writes are one statement per table over a JSON document of rows, and the writes of one
transaction can be joined into one statement (`defer` / `write_deferred`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, cast

import orjson
from sqlalchemy import Row, Table, Text, any_, bindparam, func, literal, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import LoyaltyEvent, MessageRequested
from crm_common.db import driver_connection
from crm_common.outbox import enqueue_models, enqueue_select
from loyalty import models
from loyalty.schemas import GoalRead, LedgerEntryRead, LotRead, ProgrammeConfig
from loyalty.settings import TOPIC_LOYALTY, TOPIC_MESSAGES
from loyalty.state import (
    AccountState,
    Allocation,
    Entry,
    GoalState,
    LotState,
    PointOfferState,
    PurchaseState,
    RedemptionState,
)

ACCOUNTS = cast(Table, models.Account.__table__)
LOTS = cast(Table, models.Lot.__table__)
LEDGER = cast(Table, models.LedgerEntry.__table__)
PURCHASES = cast(Table, models.Purchase.__table__)
REDEMPTIONS = cast(Table, models.Redemption.__table__)
REDEMPTION_LOTS = cast(Table, models.RedemptionLot.__table__)
GOALS = cast(Table, models.Goal.__table__)
PROGRAMME = cast(Table, models.Programme.__table__)
POINT_OFFERS = cast(Table, models.PointOffer.__table__)

_PG = postgresql.dialect()
_BIND = re.compile(r"(?<![:\w]):(\w+)")


def utc_month(at: datetime) -> date:
    """The first day of the UTC month `at` falls in (a naive time is taken as UTC, as the driver sends it)."""
    at = at.astimezone(UTC) if at.tzinfo else at
    return date(at.year, at.month, 1)


def _columns(table: Table, names: Sequence[str]) -> list[Any]:
    return [table.c[n] for n in names]


def _ids(name: str = "ids") -> Any:
    """`unnest(:name) AS t(id)`, to join with: a generic plan of `= ANY(:ids)` would compare every row with the
    whole array (the statements are prepared), a join with unnest uses the index."""
    return func.unnest(bindparam(name, type_=ARRAY(Text))).table_valued("id").render_derived(name="t")


def _recordset(table: Table, names: Sequence[str], *, numbered: bool = False) -> str:
    """`json_to_recordset(:rows) AS t(<column> <type>, ...)`, typed as the table's columns. The rows travel as one
    JSON parameter instead of an array per column, which keeps the client's encoding cost flat (PostgreSQL parses
    JSON in C)."""
    typed = [f"{n} {table.c[n].type.compile(dialect=_PG)}" for n in names] + (["n int"] if numbered else [])
    return f"json_to_recordset(CAST(:rows AS json)) AS t({', '.join(typed)})"


def _records(names: Sequence[str], objects: Iterable[Any], *, numbered: bool = False) -> str:
    """The rows for `_recordset`: each object's attributes named as the columns (`n`: the order they came in)."""
    get = attrgetter(*names)
    rows = [dict(zip(names, get(o))) for o in objects]  # noqa: B905 (one getter per name)
    if numbered:
        for i, row in enumerate(rows):
            row["n"] = i
    return orjson.dumps(rows, default=str).decode()


def _insert_sql(table: Table, names: Sequence[str], *, numbered: bool = False) -> str:
    cols = ", ".join(names)
    order = " ORDER BY n" if numbered else ""
    return f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {_recordset(table, names, numbered=numbered)}{order}"


def _update_sql(table: Table, key: Sequence[str], names: Sequence[str], extra: str = "") -> str:
    """An UPDATE of `names` from the rows, matched on `key`; the `= ANY` on the first key column lets the planner
    use its index for the rows of the document."""
    sets = ", ".join([f"{n} = t.{n}" for n in names] + ([extra] if extra else []))
    match = " AND ".join(f"{table.name}.{k} = t.{k}" for k in key)
    return (
        f"UPDATE {table.name} SET {sets} FROM {_recordset(table, [*key, *names])} WHERE {match} "
        f"AND {table.name}.{key[0]} = ANY(CAST(:keys AS text[]))"
    )


_LOT_INSERT = _insert_sql(LOTS, LotState.COLUMNS)
_LOT_UPDATE = _update_sql(LOTS, ("id",), ("remaining",))
_LEDGER_INSERT = _insert_sql(LEDGER, Entry.COLUMNS, numbered=True)
# What the Book changes in an account (the rest is set when it is created).
_ACCOUNT_WRITTEN = tuple(c for c in AccountState.COLUMNS if c not in ("customer_id", "referral_code", "created_at"))
_ACCOUNT_UPDATE = _update_sql(ACCOUNTS, ("customer_id",), _ACCOUNT_WRITTEN, "updated_at = :now")
_PURCHASE_INSERT = _insert_sql(PURCHASES, PurchaseState.COLUMNS)
_PURCHASE_UPDATE = _update_sql(
    PURCHASES, ("customer_id", "order_id"), ("refunded", "points_reversed", "points_returned")
)
_REDEMPTION_UPDATE = _update_sql(
    REDEMPTIONS, ("redemption_id",), ("status", "points_returned", "order_id", "settled_at", "cancelled_at")
)
_ALLOCATION_UPSERT = (
    _insert_sql(REDEMPTION_LOTS, Allocation.COLUMNS)
    + " ON CONFLICT (redemption_id, lot_id) DO UPDATE SET points = EXCLUDED.points, returned = EXCLUDED.returned"
)
_GOAL_UPDATE = _update_sql(GOALS, ("id",), ("progress", "status", "closed_at"))
_POINT_OFFER_INSERT = (
    _insert_sql(POINT_OFFERS, PointOfferState.COLUMNS) + " ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
)
_POINT_OFFER_WRITTEN = ("order_id", "points", "points_reversed", "used_at")
_POINT_OFFER_UPDATE = _update_sql(POINT_OFFERS, ("message_id",), _POINT_OFFER_WRITTEN)
_PO_COLS = ", ".join(f"o.{c}" for c in PointOfferState.COLUMNS)
# The open offers of the batch's buyers still valid at the earliest purchase, and the offers the refunded orders
# used (two index ranges: ix_point_offers_open, uq_point_offers_order).
_POINT_OFFERS_FOR_SQL = f"""
SELECT {_PO_COLS} FROM unnest(CAST(:buyers AS text[])) AS t(c)
JOIN point_offers o ON o.customer_id = t.c AND o.order_id IS NULL AND o.valid_until > :since
UNION ALL
SELECT {_PO_COLS} FROM unnest(CAST(:customers AS text[]), CAST(:orders AS text[])) AS t(c, o_id)
JOIN point_offers o ON o.customer_id = t.c AND o.order_id = t.o_id
"""
# For each offer that arrived after the purchases it covers: the customer's first purchase in its validity that
# earned points, was not refunded and used no other offer.
_PURCHASES_FOR_OFFERS_SQL = f"""
SELECT t.m AS offer_message_id, {", ".join(f"p.{c}" for c in PurchaseState.COLUMNS)}
FROM unnest(CAST(:messages AS text[]), CAST(:customers AS text[]), CAST(:starts AS timestamptz[]),
            CAST(:ends AS timestamptz[])) AS t(m, c, s, e)
JOIN LATERAL (
    SELECT * FROM purchases p WHERE p.customer_id = t.c AND p.occurred_at >= t.s AND p.occurred_at < t.e
      AND p.points_accrued > 0 AND p.refunded = 0
      AND NOT EXISTS (SELECT 1 FROM point_offers o WHERE o.customer_id = p.customer_id AND o.order_id = p.order_id)
    ORDER BY p.occurred_at, p.order_id LIMIT 1
) p ON true
"""

_LOCKED_IDS = _ids()
_LOCK_ACCOUNTS = (
    select(*_columns(ACCOUNTS, AccountState.COLUMNS))
    .select_from(_LOCKED_IDS.join(ACCOUNTS, ACCOUNTS.c.customer_id == _LOCKED_IDS.c.id))
    .order_by(ACCOUNTS.c.customer_id)
    .with_for_update(of=ACCOUNTS)
)

# The loyalty_redeem() function (loyalty/sql/loyalty_redeem.sql) called with named arguments.
_REDEEM_ARGS = (
    "redemption_id",
    "customer_id",
    "request_hash",
    "check_amount",
    "points_requested",
    "wanted",
    "point_value",
    "order_id",
    "store_id",
    "now",
    "now_iso",
    "check_text",
    "topic",
)
_REDEEM_SQL = (
    "SELECT points_applied, money_applied, balance_after FROM loyalty_redeem("
    + ", ".join(f"p_{a} => ${i}" for i, a in enumerate(_REDEEM_ARGS, 1))
    + ")"
)

# -- the tier window's spend and the tier rule in SQL ----------------------------------------------------------


def window_spend_sql(customer: str) -> str:
    """The spend (paid - refunded) of `customer` (an SQL expression) over purchases after :since: the months of
    spend_months after the one :since falls in, plus that month's purchases after :since (an index range, not
    the history). Parameters from `window_params`."""
    return (
        f"(coalesce((SELECT sum(m.spend) FROM spend_months m WHERE m.customer_id = {customer} "
        "AND m.month > :first_month), 0) + coalesce((SELECT sum(p.paid - p.refunded) FROM purchases p "
        f"WHERE p.customer_id = {customer} AND p.occurred_at > :since AND p.occurred_at < :next_month), 0))"
    )


def window_params(since: datetime) -> dict[str, Any]:
    first_month = utc_month(since)
    second_month = (first_month + timedelta(days=32)).replace(day=1)
    return {
        "since": since,
        "first_month": first_month,
        "next_month": datetime(second_month.year, second_month.month, 1, tzinfo=UTC),
    }


def tier_sql(spend: str) -> str:
    """The SQL form of ProgrammeConfig.tier_for: the tier with the highest min_spend reached by `spend`, else
    'base' (tests/test_rules.py pins the two together). Parameters from `tier_params`."""
    return (
        "coalesce((SELECT t.name FROM unnest(CAST(:tier_names AS text[]), CAST(:tier_mins AS numeric[])) "
        f"AS t(name, min_spend) WHERE t.min_spend <= {spend} ORDER BY t.min_spend DESC LIMIT 1), 'base')"
    )


def tier_params(programme: ProgrammeConfig) -> dict[str, Any]:
    return {"tier_names": [t.name for t in programme.tiers], "tier_mins": [t.min_spend for t in programme.tiers]}


# -- sweeps ---------------------------------------------------------------------------------------------------
# Each sweep is one statement: its changes as data-modifying CTEs, and the outbox rows selected from what they
# returned (`enqueue_select`), as the JSON of the topic's contract model (tests/test_rules.py validates each).

_ISO = '\'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"\''


def _iso(col: str) -> str:
    return f"to_char({col} AT TIME ZONE 'UTC', {_ISO})"


def _messages(source: str, fields: str) -> str:
    """The outbox rows (`topic, key, value`) of one message per row of `source`, keyed by its customer_id: the
    JSON object of these `json_build_object` fields."""
    return (
        f"SELECT CAST(:topic AS text), customer_id, convert_to(json_build_object({fields})::text, 'UTF8') FROM {source}"
    )


# Lots whose points expire within the reminder window and were not reminded for this expiry date, marked, then
# summed per customer and UTC day: one MessageRequested each, its id derived from customer and day (so never
# sent twice for one expiry date).
_REMIND_CTES = """
due AS (
    UPDATE lots SET reminded_for = expires_at
    WHERE remaining > 0 AND expires_at > :now AND expires_at <= :now + make_interval(days => CAST(:days AS int))
      AND reminded_for IS DISTINCT FROM expires_at
    RETURNING customer_id, expires_at, remaining
), per_day AS (
    SELECT customer_id, (expires_at AT TIME ZONE 'UTC')::date AS day, min(expires_at) AS first_at,
           sum(remaining) AS points
    FROM due GROUP BY customer_id, (expires_at AT TIME ZONE 'UTC')::date
)
"""
_REMIND_SELECT = _messages(
    "per_day",
    f"""
    'id', 'loyalty:points_expiring:' || customer_id || ':' || day::text,
    'type', 'message.requested', 'customer_id', customer_id, 'occurred_at', CAST(:now_iso AS text),
    'kind', 'transactional', 'template', 'points_expiring', 'source_service', 'loyalty',
    'expires_at', {_iso("first_at")},
    'variables', json_build_object('points', points::text, 'amount', round(points * CAST(:pv AS numeric), 2)::text,
                                   'expires_on', day::text, 'expires_at', {_iso("first_at")})""",
)

# The accounts with expired lots, locked in the same order as every other writer locks them.
_LOCK_EXPIRING_SQL = """
SELECT customer_id FROM accounts
WHERE customer_id IN (SELECT customer_id FROM lots WHERE remaining > 0 AND expires_at <= :now)
ORDER BY customer_id LIMIT :limit FOR UPDATE
"""

# The expired lots of the locked accounts, oldest first: each one's points leave the lot and the account in one
# ledger entry (with the balance after it), published as points.expired. A separate statement from the lock,
# so it reads the lots as committed after the locks were granted.
_EXPIRE_CTES = """
due AS (
    SELECT l.id, l.customer_id, l.remaining, l.expired_points, l.expires_at,
           a.balance - sum(l.remaining) OVER (PARTITION BY l.customer_id ORDER BY l.expires_at, l.id) AS balance_after
    FROM lots l JOIN accounts a ON a.customer_id = l.customer_id
    WHERE l.customer_id = ANY(CAST(:ids AS text[])) AND l.remaining > 0 AND l.expires_at <= :now
), lots_done AS (
    UPDATE lots SET remaining = 0, expired_points = lots.expired_points + due.remaining
    FROM due WHERE lots.id = due.id
), accounts_done AS (
    UPDATE accounts SET balance = accounts.balance - t.total, updated_at = :now
    FROM (SELECT customer_id, sum(remaining) AS total FROM due GROUP BY customer_id) t
    WHERE accounts.customer_id = t.customer_id
), entries AS (
    INSERT INTO ledger (ref, customer_id, kind, points, balance_after, occurred_at, recorded_at, lot_id, data)
    SELECT 'expiry:' || id || ':' || expired_points::text, customer_id, 'expiry', -remaining, balance_after,
           expires_at, :now, id, jsonb_build_object('expired_lot', id)
    FROM due
    RETURNING ref, customer_id, points, balance_after, occurred_at, lot_id
)
"""
_EXPIRE_SELECT = _messages(
    "entries",
    f"""
    'id', 'loyalty:points.expired:' || ref, 'type', 'points.expired', 'customer_id', customer_id,
    'occurred_at', {_iso("occurred_at")}, 'points', points::text, 'balance', balance_after::text,
    'data', json_build_object('lot_id', lot_id)""",
)

_EXPIRE_GOALS_CTES = """
expired AS (
    UPDATE goals SET status = 'expired', closed_at = due_at
    WHERE status = 'active' AND due_at <= :now
    RETURNING id, customer_id, due_at, progress, target
)
"""
_EXPIRE_GOALS_SELECT = _messages(
    "expired",
    f"""
    'id', 'loyalty:goal.expired:' || id, 'type', 'goal.expired', 'customer_id', customer_id,
    'occurred_at', {_iso("due_at")},
    'data', json_build_object('goal_id', id, 'progress', progress, 'target', target)""",
)

_BIRTHDAY_LOCK_SQL = """
SELECT customer_id FROM accounts
WHERE birth_date IS NOT NULL AND to_char(birth_date, 'MM-DD') = ANY(CAST(:days AS text[]))
  AND (birthday_awarded_year IS NULL OR birthday_awarded_year < CAST(:year AS int))
ORDER BY customer_id LIMIT :limit FOR UPDATE
"""

# The tier each account above base qualifies for by its spend in the window (all of them, or the given ones).
_TIER_TARGET = f"""
target AS (
    SELECT customer_id, tier AS old_tier, spend, {tier_sql("spend")} AS new_tier
    FROM (SELECT a.customer_id, a.tier, {window_spend_sql("a.customer_id")} AS spend FROM accounts a
          WHERE a.tier <> 'base' AND (CAST(:ids AS text[]) IS NULL OR a.customer_id = ANY(CAST(:ids AS text[])))) s
)
"""

_TIER_CANDIDATES_SQL = f"""
WITH {_TIER_TARGET}
SELECT customer_id FROM target WHERE new_tier <> old_tier ORDER BY customer_id LIMIT :limit
"""

_TIER_LOCK_SQL = "SELECT customer_id FROM accounts WHERE customer_id = ANY(CAST(:ids AS text[])) ORDER BY 1 FOR UPDATE"

_TIER_CTES = f"""
{_TIER_TARGET}, changed AS (
    UPDATE accounts a SET tier = target.new_tier, updated_at = :now
    FROM target WHERE a.customer_id = target.customer_id AND target.new_tier <> target.old_tier
    RETURNING a.customer_id, target.old_tier, target.new_tier, target.spend
)
"""
_TIER_SELECT = _messages(
    "changed",
    """
    'id', 'loyalty:tier.changed:sweep:' || customer_id || ':' || CAST(:now_iso AS text), 'type', 'tier.changed',
    'customer_id', customer_id, 'occurred_at', CAST(:now_iso AS text),
    'data', json_build_object('from', old_tier, 'to', new_tier, 'spend_12m', spend::text, 'reason', 'window')""",
)

# -- reports --------------------------------------------------------------------------------------------------

_MONTHS_SQL = """
WITH m AS (
    SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
           coalesce(sum(points) FILTER (WHERE kind IN ('accrual', 'goal_bonus', 'referral_bonus', 'welcome_bonus',
                                                       'birthday_bonus', 'offer_bonus')), 0) AS issued,
           coalesce(-sum(points) FILTER (WHERE (kind = 'reversal' AND data->>'reverses' IN ('accrual', 'offer_bonus'))
                                               OR kind = 'debt_settlement'), 0) AS reversed,
           coalesce(-sum(points) FILTER (WHERE kind = 'redemption'), 0)
             - coalesce(sum(points) FILTER (WHERE kind = 'reversal' AND data->>'reverses' = 'redemption'), 0)
             AS redeemed,
           coalesce(-sum(points) FILTER (WHERE kind = 'expiry'), 0) AS expired,
           coalesce(sum(points) FILTER (WHERE kind = 'adjustment'), 0) AS adjusted,
           sum(points) AS net
    FROM ledger GROUP BY 1
)
SELECT month, issued, reversed, redeemed, expired, adjusted, sum(net) OVER (ORDER BY month) AS liability
FROM m ORDER BY month
"""

_MEMBERS_SQL = """
SELECT count(*) AS members, count(*) FILTER (WHERE purchases_count >= 1) AS purchasing,
       count(*) FILTER (WHERE purchases_count >= 2) AS repeat_purchasing
FROM accounts
"""


class LoyaltyRepository:
    """The loyalty service's SQL, over the caller's session (the caller's boundary commits)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._deferred: list[tuple[str, dict[str, Any]]] | None = None

    async def _exec(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        return await self.session.execute(text(sql), params or {})

    async def _write(self, sql: str, params: dict[str, Any]) -> None:
        if self._deferred is not None:
            self._deferred.append((sql, params))
        else:
            await self._exec(sql, params)

    def defer(self) -> None:
        """Collect the following writes and send them as one statement in `write_deferred`."""
        if self._deferred is None:
            self._deferred = []

    async def write_deferred(self) -> None:
        """Send the collected writes as one statement of data-modifying CTEs: one round trip, not one per table.

        The writes touch disjoint rows (new vs existing lots and purchases, one row per account), which is
        what PostgreSQL requires of data-modifying CTEs in one statement.
        """
        parts, self._deferred = self._deferred or [], None
        if len(parts) <= 1:
            for sql, params in parts:
                await self._exec(sql, params)
            return
        ctes, merged = [], {}
        for i, (sql, params) in enumerate(parts):
            renamed = _BIND.sub(rf":w{i}_\1", sql)
            ctes.append(f"w{i} AS ({renamed})")
            merged.update({f"w{i}_{k}": v for k, v in params.items()})
        await self._exec("WITH " + ", ".join(ctes) + " SELECT 1", merged)

    # -- outbox ----------------------------------------------------------------------------------

    async def enqueue(self, topic: str, messages: Sequence[LoyaltyEvent | MessageRequested]) -> None:
        """Outbox rows of contract messages, in the caller's transaction."""
        if messages:
            await enqueue_models(self.session, topic, messages)

    # -- programme -------------------------------------------------------------------------------

    async def get_programme(self) -> Any:
        """The programme's row (`config`, `updated_at`), None until an operator configures it."""
        stmt = select(PROGRAMME.c.config, PROGRAMME.c.updated_at).where(PROGRAMME.c.id == 1)
        return (await self.session.execute(stmt)).first()

    async def put_programme(self, config: dict[str, Any], now: datetime) -> None:
        stmt = pg_insert(PROGRAMME).values(id=1, config=config, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[PROGRAMME.c.id], set_={"config": stmt.excluded.config, "updated_at": now}
        )
        await self.session.execute(stmt)

    # -- accounts --------------------------------------------------------------------------------

    async def insert_accounts(self, ids: list[str], codes: list[str], now: datetime) -> set[str]:
        """Create the accounts that do not exist yet; return the ids created."""
        result = await self._exec(
            "INSERT INTO accounts (customer_id, referral_code, created_at, updated_at) "
            "SELECT i, c, :now, :now FROM unnest(CAST(:ids AS text[]), CAST(:codes AS text[])) AS t(i, c) "
            "ON CONFLICT (customer_id) DO NOTHING RETURNING customer_id",
            {"ids": ids, "codes": codes, "now": now},
        )
        return set(result.scalars())

    async def lock_accounts(self, ids: list[str]) -> list[AccountState]:
        """Lock the accounts in a fixed order (so concurrent lockers never deadlock) and read them."""
        result = await self.session.execute(_LOCK_ACCOUNTS, {"ids": ids})
        return [AccountState(**m) for m in result.mappings()]

    async def get_account(self, customer_id: str) -> AccountState | None:
        stmt = select(*_columns(ACCOUNTS, AccountState.COLUMNS)).where(ACCOUNTS.c.customer_id == customer_id)
        row = (await self.session.execute(stmt)).mappings().first()
        return AccountState(**row) if row is not None else None

    async def update_accounts(self, accounts: Sequence[AccountState], now: datetime) -> None:
        if not accounts:
            return
        await self._write(
            _ACCOUNT_UPDATE,
            {
                "rows": _records(("customer_id", *_ACCOUNT_WRITTEN), accounts),
                "now": now,
                "keys": [a.customer_id for a in accounts],
            },
        )

    async def customer_by_code(self, code: str) -> str | None:
        stmt = select(ACCOUNTS.c.customer_id).where(ACCOUNTS.c.referral_code == code)
        return (await self.session.execute(stmt)).scalar()

    async def referral_ancestors(self, customer_id: str, limit: int = 1000) -> list[str]:
        """Who referred this customer, who referred them, and so on (bounded)."""
        result = await self._exec(
            "WITH RECURSIVE up(cid, depth) AS ("
            "  SELECT referred_by, 1 FROM accounts WHERE customer_id = :c AND referred_by IS NOT NULL"
            "  UNION ALL"
            "  SELECT a.referred_by, up.depth + 1 FROM accounts a JOIN up ON a.customer_id = up.cid"
            "  WHERE a.referred_by IS NOT NULL AND up.depth < :limit"
            ") SELECT cid FROM up",
            {"c": customer_id, "limit": limit},
        )
        return list(result.scalars())

    async def spend_since(self, ids: list[str], since: datetime) -> dict[str, Decimal]:
        """Each customer's spend (paid - refunded) over purchases after `since` (`window_spend_sql`)."""
        result = await self._exec(
            f"SELECT t.cid, {window_spend_sql('t.cid')} AS spend FROM unnest(CAST(:ids AS text[])) AS t(cid)",
            {"ids": ids, **window_params(since)},
        )
        return {r.cid: r.spend for r in result}

    async def add_monthly_spend(self, changes: Mapping[tuple[str, date], Decimal]) -> None:
        """Add spend changes, keyed by (customer_id, month), to spend_months."""
        if not changes:
            return
        await self._write(
            "INSERT INTO spend_months (customer_id, month, spend) SELECT * FROM unnest(CAST(:customer_id AS text[]), "
            "CAST(:month AS date[]), CAST(:spend AS numeric[])) ON CONFLICT (customer_id, month) "
            "DO UPDATE SET spend = spend_months.spend + EXCLUDED.spend",
            {
                "customer_id": [c for c, _ in changes],
                "month": [m for _, m in changes],
                "spend": list(changes.values()),
            },
        )

    # -- lots ------------------------------------------------------------------------------------

    async def open_lots(self, customer_id: str) -> list[LotState]:
        stmt = select(*_columns(LOTS, LotState.COLUMNS)).where(LOTS.c.customer_id == customer_id, LOTS.c.remaining > 0)
        return [LotState(**m) for m in (await self.session.execute(stmt)).mappings()]

    async def lots_by_ids(self, ids: list[str]) -> list[LotState]:
        stmt = select(*_columns(LOTS, LotState.COLUMNS)).where(LOTS.c.id == any_(bindparam("ids", type_=ARRAY(Text))))
        return [LotState(**m) for m in (await self.session.execute(stmt, {"ids": ids})).mappings()]

    async def list_lots(self, customer_id: str, *, open_only: bool) -> list[LotRead]:
        stmt = select(*_columns(LOTS, tuple(LotRead.model_fields))).where(LOTS.c.customer_id == customer_id)
        if open_only:
            stmt = stmt.where(LOTS.c.remaining > 0)
        stmt = stmt.order_by(LOTS.c.expires_at, LOTS.c.earned_at, LOTS.c.id)
        return [LotRead(**m) for m in (await self.session.execute(stmt)).mappings()]

    async def insert_lots(self, lots: Sequence[LotState]) -> None:
        if lots:
            await self._write(_LOT_INSERT, {"rows": _records(LotState.COLUMNS, lots)})

    async def update_lots(self, lots: Sequence[LotState]) -> None:
        """Write the lots' `remaining`."""
        if lots:
            await self._write(
                _LOT_UPDATE, {"rows": _records(("id", "remaining"), lots), "keys": [lot.id for lot in lots]}
            )

    # -- ledger ----------------------------------------------------------------------------------

    async def insert_ledger(self, entries: Sequence[Entry]) -> None:
        """Append entries, in the order they happened (their seq follows it)."""
        if entries:
            await self._write(_LEDGER_INSERT, {"rows": _records(Entry.COLUMNS, entries, numbered=True)})

    async def ledger_by_ref(self, ref: str) -> Row[Any] | None:
        """The entry with this ref (seq, ref, customer_id, kind, points, balance_after, data)."""
        stmt = select(*_columns(LEDGER, ("seq", "ref", "customer_id", "kind", "points", "balance_after", "data")))
        return (await self.session.execute(stmt.where(LEDGER.c.ref == ref))).first()

    async def ledger_page(self, customer_id: str, *, before: int | None, limit: int) -> list[LedgerEntryRead]:
        stmt = select(*_columns(LEDGER, tuple(LedgerEntryRead.model_fields))).where(LEDGER.c.customer_id == customer_id)
        if before is not None:
            stmt = stmt.where(LEDGER.c.seq < before)
        stmt = stmt.order_by(LEDGER.c.seq.desc()).limit(limit)
        return [LedgerEntryRead(**m) for m in (await self.session.execute(stmt)).mappings()]

    # -- purchases -------------------------------------------------------------------------------

    async def purchases_for(self, keys: Iterable[tuple[str, str]]) -> list[PurchaseState]:
        """The purchases recorded for these (customer_id, order_id)."""
        keys = list(keys)
        if not keys:
            return []
        # A join with unnest: the generic plan of `customer_id = ANY(:c) AND (...) IN (...)` scanned the whole
        # purchases table and compared every row with the array, so each batch cost more as history grew.
        cols = ", ".join(f"p.{c}" for c in PurchaseState.COLUMNS)
        result = await self._exec(
            f"SELECT {cols} FROM unnest(CAST(:customers AS text[]), CAST(:orders AS text[])) AS t(c, o) "
            "JOIN purchases p ON p.customer_id = t.c AND p.order_id = t.o",
            {"customers": [c for c, _ in keys], "orders": [o for _, o in keys]},
        )
        return [PurchaseState(**m) for m in result.mappings()]

    async def insert_purchases(self, purchases: Sequence[PurchaseState]) -> None:
        if purchases:
            await self._write(_PURCHASE_INSERT, {"rows": _records(PurchaseState.COLUMNS, purchases)})

    async def update_purchases(self, purchases: Sequence[PurchaseState]) -> None:
        """Write what refunds change: refunded, points_reversed, points_returned."""
        if purchases:
            names = ("customer_id", "order_id", "refunded", "points_reversed", "points_returned")
            await self._write(
                _PURCHASE_UPDATE, {"rows": _records(names, purchases), "keys": [p.customer_id for p in purchases]}
            )

    # -- points-multiplier offers ----------------------------------------------------------------

    async def insert_point_offers(self, offers: Sequence[PointOfferState]) -> set[str]:
        """Record offers not seen before; return the message ids inserted (a redelivery inserts nothing)."""
        if not offers:
            return set()
        result = await self._exec(_POINT_OFFER_INSERT, {"rows": _records(PointOfferState.COLUMNS, offers)})
        return set(result.scalars())

    async def point_offers_for(
        self, buyers: list[str], since: datetime, refunded: Iterable[tuple[str, str]]
    ) -> list[PointOfferState]:
        """The buyers' unused offers valid after `since`, and the offers used by these (customer_id, order_id)."""
        refunded = list(refunded)
        if not buyers and not refunded:
            return []
        result = await self._exec(
            _POINT_OFFERS_FOR_SQL,
            {
                "buyers": buyers,
                "since": since,
                "customers": [c for c, _ in refunded],
                "orders": [o for _, o in refunded],
            },
        )
        return [PointOfferState(**m) for m in result.mappings()]

    async def purchases_for_offers(self, offers: Sequence[PointOfferState]) -> dict[str, PurchaseState]:
        """Per offer (message id): the first recorded purchase it covers that no offer has used yet."""
        if not offers:
            return {}
        result = await self._exec(
            _PURCHASES_FOR_OFFERS_SQL,
            {
                "messages": [o.message_id for o in offers],
                "customers": [o.customer_id for o in offers],
                "starts": [o.requested_at for o in offers],
                "ends": [o.valid_until for o in offers],
            },
        )
        found = {}
        for m in result.mappings():
            row = dict(m)
            message_id = row.pop("offer_message_id")
            found[message_id] = PurchaseState(**row)
        return found

    async def update_point_offers(self, offers: Sequence[PointOfferState]) -> None:
        """Write what accrual and refunds change: order_id, points, points_reversed, used_at."""
        if offers:
            await self._write(
                _POINT_OFFER_UPDATE,
                {
                    "rows": _records(("message_id", *_POINT_OFFER_WRITTEN), offers),
                    "keys": [o.message_id for o in offers],
                },
            )

    # -- redemptions -----------------------------------------------------------------------------

    async def get_redemptions(self, ids: list[str]) -> list[RedemptionState]:
        """The redemptions, each with the balance after its ledger entry."""
        if not ids:
            return []
        stmt = (
            select(*_columns(REDEMPTIONS, RedemptionState.COLUMNS), LEDGER.c.balance_after)
            .select_from(
                REDEMPTIONS.outerjoin(
                    LEDGER, LEDGER.c.ref == literal("redemption:", Text) + REDEMPTIONS.c.redemption_id
                )
            )
            .where(REDEMPTIONS.c.redemption_id == any_(bindparam("ids", type_=ARRAY(Text))))
        )
        return [RedemptionState(**m) for m in (await self.session.execute(stmt, {"ids": ids})).mappings()]

    async def insert_redemption(self, r: RedemptionState) -> bool:
        """Insert a redemption unless its id exists (then False: the caller compares bodies)."""
        names = [c for c in RedemptionState.COLUMNS if c not in ("points_returned", "settled_at", "cancelled_at")]
        stmt = (
            pg_insert(REDEMPTIONS)
            .values({n: getattr(r, n) for n in names})
            .on_conflict_do_nothing(index_elements=[REDEMPTIONS.c.redemption_id])
            .returning(REDEMPTIONS.c.redemption_id)
        )
        return (await self.session.execute(stmt)).first() is not None

    async def redeem_new(self, **args: Any) -> Any:
        """A new redemption in one statement (`loyalty_redeem`, loyalty/sql/loyalty_redeem.sql), arguments named
        as `_REDEEM_ARGS`: the record (points_applied, money_applied, balance_after), or None when the general path
        must answer.

        Sent on the session's own asyncpg connection as a prepared statement: the hot path skips SQLAlchemy's
        statement handling. The call is one statement, so it is atomic on its own; inside the session's
        transaction when one is open. The function notifies the relay, which publishes at the commit.
        """
        raw = await driver_connection(self.session)
        return await raw.fetchrow(_REDEEM_SQL, *(args[a] for a in _REDEEM_ARGS))

    async def update_redemptions(self, redemptions: Sequence[RedemptionState]) -> None:
        if redemptions:
            names = ("redemption_id", "status", "points_returned", "order_id", "settled_at", "cancelled_at")
            await self._write(
                _REDEMPTION_UPDATE,
                {"rows": _records(names, redemptions), "keys": [r.redemption_id for r in redemptions]},
            )

    async def redemption_lots(self, redemption_id: str) -> list[Allocation]:
        """A redemption's allocations, latest-expiring lot first (the order points go back in)."""
        stmt = (
            select(*_columns(REDEMPTION_LOTS, Allocation.COLUMNS))
            .join(LOTS, LOTS.c.id == REDEMPTION_LOTS.c.lot_id)
            .where(REDEMPTION_LOTS.c.redemption_id == redemption_id)
            .order_by(LOTS.c.expires_at.desc(), LOTS.c.id.desc())
        )
        return [Allocation(**m) for m in (await self.session.execute(stmt)).mappings()]

    async def upsert_redemption_lots(self, allocations: Sequence[Allocation]) -> None:
        """Write the final state of each allocation."""
        if allocations:
            await self._write(_ALLOCATION_UPSERT, {"rows": _records(Allocation.COLUMNS, allocations)})

    # -- goals -----------------------------------------------------------------------------------

    async def active_goals(self, ids: list[str]) -> list[GoalState]:
        t = _ids()
        stmt = (
            select(*_columns(GOALS, GoalState.COLUMNS))
            .select_from(t.join(GOALS, GOALS.c.customer_id == t.c.id))
            .where(GOALS.c.status == "active")
        )
        return [GoalState(**m) for m in (await self.session.execute(stmt, {"ids": ids})).mappings()]

    async def goals_of(self, customer_id: str) -> list[GoalRead]:
        stmt = (
            select(*_columns(GOALS, tuple(GoalRead.model_fields)))
            .where(GOALS.c.customer_id == customer_id)
            .order_by(GOALS.c.assigned_at.desc())
            .limit(20)
        )
        return [GoalRead(**m) for m in (await self.session.execute(stmt)).mappings()]

    async def insert_goal(self, goal: GoalState) -> bool:
        """Insert a new goal unless the customer has an active one or this goal exists."""
        stmt = (
            pg_insert(GOALS)
            .values({c: getattr(goal, c) for c in GoalState.COLUMNS})
            .on_conflict_do_nothing()
            .returning(GOALS.c.id)
        )
        return (await self.session.execute(stmt)).first() is not None

    async def update_goals(self, goals: Sequence[GoalState]) -> None:
        if goals:
            await self._write(
                _GOAL_UPDATE,
                {"rows": _records(("id", "progress", "status", "closed_at"), goals), "keys": [g.id for g in goals]},
            )

    # -- sweeps ----------------------------------------------------------------------------------

    async def remind_expiring(self, now: datetime, *, days: int, point_value: Decimal) -> int:
        """Request one `points_expiring` message per customer and UTC day on which points expire within `days`,
        once per expiry date; return how many."""
        params = {"now": now, "now_iso": now.isoformat(), "days": days, "pv": point_value, "topic": TOPIC_MESSAGES}
        return await enqueue_select(self.session, _REMIND_SELECT, params, ctes=_REMIND_CTES)

    async def lock_expiring_accounts(self, now: datetime, *, limit: int) -> list[str]:
        return list((await self._exec(_LOCK_EXPIRING_SQL, {"now": now, "limit": limit})).scalars())

    async def expire_lots(self, ids: list[str], now: datetime) -> int:
        """Expire the lots past their expiry of these locked accounts, oldest first: one ledger entry and one
        `points.expired` message per lot; return the number of lots."""
        params = {"ids": ids, "now": now, "topic": TOPIC_LOYALTY}
        return await enqueue_select(self.session, _EXPIRE_SELECT, params, ctes=_EXPIRE_CTES)

    async def expire_goals(self, now: datetime) -> int:
        """Expire the active goals due by `now`, each published as `goal.expired`; return how many."""
        params = {"now": now, "topic": TOPIC_LOYALTY}
        return await enqueue_select(self.session, _EXPIRE_GOALS_SELECT, params, ctes=_EXPIRE_GOALS_CTES)

    async def lock_birthdays(self, days: list[str], year: int, *, limit: int) -> list[str]:
        """Lock the accounts whose birthday (MM-DD) is one of `days` and not yet awarded in `year`."""
        return list((await self._exec(_BIRTHDAY_LOCK_SQL, {"days": days, "year": year, "limit": limit})).scalars())

    async def move_tiers(self, programme: ProgrammeConfig, now: datetime, *, limit: int) -> int:
        """Move the accounts whose window spend no longer matches their tier, each change published as
        `tier.changed`; return how many."""
        params = {
            **window_params(now - timedelta(days=programme.tier_window_days)),
            **tier_params(programme),
            "now": now,
            "limit": limit,
        }
        ids = list((await self._exec(_TIER_CANDIDATES_SQL, {**params, "ids": None})).scalars())
        if not ids:
            return 0
        # Lock, then recompute in a new statement: it sees purchases committed while it waited for the locks.
        await self._exec(_TIER_LOCK_SQL, {"ids": ids})
        params |= {"ids": ids, "now_iso": now.isoformat(), "topic": TOPIC_LOYALTY}
        return await enqueue_select(self.session, _TIER_SELECT, params, ctes=_TIER_CTES)

    async def tiers_of_spends(self, programme: ProgrammeConfig, spends: list[Decimal]) -> list[str]:
        """The tier `tier_sql` gives each spend (what the tier sweep decides with)."""
        result = await self._exec(
            f"SELECT {tier_sql('s.spend')} FROM unnest(CAST(:spends AS numeric[])) WITH ORDINALITY AS s(spend, n) "
            "ORDER BY s.n",
            {"spends": spends, **tier_params(programme)},
        )
        return list(result.scalars())

    # -- reports ---------------------------------------------------------------------------------

    async def monthly_flows(self) -> list[Row[Any]]:
        """Points per UTC month: issued, reversed, redeemed, expired, adjusted, and the liability after it."""
        return list((await self._exec(_MONTHS_SQL)).all())

    async def members(self) -> Row[Any]:
        """Accounts, accounts with a purchase, accounts with two or more."""
        return (await self._exec(_MEMBERS_SQL)).one()
