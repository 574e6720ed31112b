"""Every query of the loyalty service. Writes are bulk statements over arrays (unnest), one per table."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common import serde
from crm_common.outbox import mark_outbox_written

_ACCOUNT_COLS = (
    "customer_id, balance, tier, referral_code, referred_by, referral_rewarded, purchases_count, "
    "first_purchase_at, last_purchase_at, birth_date, created_at, points_debt"
)
_LOT_COLS = "id, customer_id, kind, earned_at, expires_at, points, remaining, expired_points"
_PURCHASE_COLS = (
    "customer_id, order_id, message_id, occurred_at, total, paid, refunded, points_accrued, points_reversed, "
    "redemption_id, points_redeemed, points_returned, reconciliation"
)
_REDEMPTION_COLS = (
    "r.redemption_id, r.customer_id, r.request_hash, r.check_amount, r.points_requested, r.points_applied, "
    "r.money_applied, r.points_returned, r.status, r.order_id, r.store_id, r.created_at, r.settled_at, r.cancelled_at"
)
_GOAL_COLS = "id, customer_id, segment_key, target, progress, reward, status, assigned_at, due_at, closed_at"


_BIND = re.compile(r"(?<![:\w]):(\w+)")


def utc_month(at: datetime) -> date:
    """The first day of the UTC month `at` falls in (a naive time is taken as UTC, as the driver sends it)."""
    at = at.astimezone(UTC) if at.tzinfo else at
    return date(at.year, at.month, 1)


def _prefixed(alias: str, cols: str) -> str:
    """A column list qualified with a table alias (for joins)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in cols.split(","))


def _col(rows: Sequence[Sequence[Any]], i: int) -> list[Any]:
    return [r[i] for r in rows]


def _json_rows(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows as one JSON document for json_to_recordset: one parameter instead of an array per column,
    which keeps the client's encoding cost flat (PostgreSQL parses JSON in C)."""
    return orjson.dumps([dict(zip(names, r, strict=True)) for r in rows], default=str).decode()


_REDEEM_SQL = "SELECT * FROM loyalty_redeem($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"


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

    async def insert_outbox(self, messages: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Outbox rows as crm_common.outbox.enqueue_many writes them, but joinable with the other writes."""
        if not messages:
            return
        if not all(m[2].get("id") for m in messages):
            raise ValueError("an outbox message needs a stable 'id'")
        mark_outbox_written(self.session)
        await self._write(
            "INSERT INTO outbox (topic, key, value) SELECT * FROM unnest(CAST(:topics AS text[]), "
            "CAST(:keys AS text[]), CAST(:values AS bytea[]))",
            {
                "topics": [m[0] for m in messages],
                "keys": [m[1] for m in messages],
                "values": [serde.dumps(m[2]) for m in messages],
            },
        )

    # -- programme -------------------------------------------------------------------------------

    async def get_programme(self) -> Any:
        return (await self._exec("SELECT config, updated_at FROM programme WHERE id = 1")).first()

    async def put_programme(self, config: dict[str, Any], now: datetime) -> None:
        await self._exec(
            "INSERT INTO programme (id, config, updated_at) VALUES (1, CAST(:c AS jsonb), :now) "
            "ON CONFLICT (id) DO UPDATE SET config = EXCLUDED.config, updated_at = EXCLUDED.updated_at",
            {"c": serde.dumps(config).decode(), "now": now},
        )

    # -- accounts --------------------------------------------------------------------------------

    async def insert_accounts(self, ids: list[str], codes: list[str], now: datetime) -> set[str]:
        """Create the accounts that do not exist yet; return the ids created."""
        result = await self._exec(
            "INSERT INTO accounts (customer_id, referral_code, created_at, updated_at) "
            "SELECT i, c, :now, :now FROM unnest(CAST(:ids AS text[]), CAST(:codes AS text[])) AS t(i, c) "
            "ON CONFLICT (customer_id) DO NOTHING RETURNING customer_id",
            {"ids": ids, "codes": codes, "now": now},
        )
        return {r[0] for r in result}

    async def lock_accounts(self, ids: list[str]) -> list[Any]:
        """Lock the accounts in a fixed order (so concurrent lockers never deadlock) and read them."""
        # A join with unnest, not `= ANY(:ids)`: a generic plan would compare every row with the whole array.
        result = await self._exec(
            f"SELECT {_prefixed('a', _ACCOUNT_COLS)} FROM unnest(CAST(:ids AS text[])) AS t(c) "
            "JOIN accounts a ON a.customer_id = t.c ORDER BY a.customer_id FOR UPDATE OF a",
            {"ids": ids},
        )
        return list(result.all())

    async def get_account(self, customer_id: str) -> Any:
        return (
            await self._exec(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE customer_id = :c", {"c": customer_id})
        ).first()

    async def update_accounts(self, rows: list[tuple[Any, ...]], now: datetime) -> None:
        """rows: (customer_id, balance, points_debt, tier, referred_by, referral_rewarded, purchases_count,
        first_purchase_at, last_purchase_at, birth_date)."""
        if not rows:
            return
        names = ("c", "bal", "debt", "tier", "ref", "rr", "pc", "fp", "lp", "bd")
        await self._write(
            "UPDATE accounts a SET balance = t.bal, points_debt = t.debt, tier = t.tier, referred_by = t.ref, "
            "referral_rewarded = t.rr, purchases_count = t.pc, first_purchase_at = t.fp, last_purchase_at = t.lp, "
            "birth_date = t.bd, updated_at = :now FROM json_to_recordset(CAST(:rows AS json)) AS t(c text, "
            "bal numeric, debt numeric, tier text, ref text, rr boolean, pc int, fp timestamptz, lp timestamptz, "
            "bd date) WHERE a.customer_id = t.c "
            "AND a.customer_id = ANY(CAST(:ids AS text[]))",
            {"rows": _json_rows(names, rows), "now": now, "ids": _col(rows, 0)},
        )

    async def customer_by_code(self, code: str) -> str | None:
        return (await self._exec("SELECT customer_id FROM accounts WHERE referral_code = :c", {"c": code})).scalar()

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
        return [r[0] for r in result]

    async def spend_since(self, ids: list[str], since: datetime) -> dict[str, Decimal]:
        """Each customer's spend (paid - refunded) over purchases after `since`: the months of spend_months after
        the one `since` falls in, plus that month's purchases after `since` (an index range, not the history)."""
        first_month = utc_month(since)
        second_month = (first_month + timedelta(days=32)).replace(day=1)
        # A join with unnest, not `= ANY(:ids)`: a generic plan would compare every row with the whole array.
        result = await self._exec(
            "SELECT t.cid, coalesce((SELECT sum(m.spend) FROM spend_months m WHERE m.customer_id = t.cid "
            "AND m.month > :first_month), 0) + coalesce((SELECT sum(p.paid - p.refunded) FROM purchases p "
            "WHERE p.customer_id = t.cid AND p.occurred_at > :since AND p.occurred_at < :next_month), 0) "
            "FROM unnest(CAST(:ids AS text[])) AS t(cid)",
            {
                "ids": ids,
                "since": since,
                "first_month": first_month,
                "next_month": datetime(second_month.year, second_month.month, 1, tzinfo=UTC),
            },
        )
        return {r[0]: r[1] for r in result}

    async def add_monthly_spend(self, rows: list[tuple[str, date, Decimal]]) -> None:
        """rows: (customer_id, month, spend change), at most one per (customer_id, month)."""
        if not rows:
            return
        await self._write(
            "INSERT INTO spend_months (customer_id, month, spend) SELECT * FROM unnest(CAST(:c AS text[]), "
            "CAST(:m AS date[]), CAST(:s AS numeric[])) ON CONFLICT (customer_id, month) "
            "DO UPDATE SET spend = spend_months.spend + EXCLUDED.spend",
            {n: _col(rows, i) for i, n in enumerate(("c", "m", "s"))},
        )

    # -- lots ------------------------------------------------------------------------------------

    async def open_lots(self, customer_id: str) -> list[Any]:
        result = await self._exec(
            f"SELECT {_LOT_COLS} FROM lots WHERE customer_id = :c AND remaining > 0",
            {"c": customer_id},
        )
        return list(result.all())

    async def lots_by_ids(self, ids: list[str]) -> list[Any]:
        result = await self._exec(f"SELECT {_LOT_COLS} FROM lots WHERE id = ANY(CAST(:ids AS text[]))", {"ids": ids})
        return list(result.all())

    async def list_lots(self, customer_id: str, *, open_only: bool) -> list[Any]:
        where = "AND remaining > 0" if open_only else ""
        result = await self._exec(
            f"SELECT {_LOT_COLS} FROM lots WHERE customer_id = :c {where} ORDER BY expires_at, earned_at, id",
            {"c": customer_id},
        )
        return list(result.all())

    async def insert_lots(self, rows: list[tuple[Any, ...]]) -> None:
        """rows: (id, customer_id, kind, earned_at, expires_at, points, remaining)."""
        if not rows:
            return
        await self._write(
            "INSERT INTO lots (id, customer_id, kind, earned_at, expires_at, points, remaining) "
            "SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS t(i text, c text, k text, e timestamptz, "
            "x timestamptz, p numeric, r numeric)",
            {"rows": _json_rows(("i", "c", "k", "e", "x", "p", "r"), rows)},
        )

    async def update_lots(self, rows: list[tuple[str, Decimal]]) -> None:
        if not rows:
            return
        await self._write(
            "UPDATE lots SET remaining = t.r FROM unnest(CAST(:id AS text[]), CAST(:r AS numeric[])) AS t(id, r) "
            "WHERE lots.id = t.id AND lots.id = ANY(CAST(:id AS text[]))",
            {"id": _col(rows, 0), "r": _col(rows, 1)},
        )

    # -- ledger ----------------------------------------------------------------------------------

    async def insert_ledger(self, rows: list[tuple[Any, ...]]) -> None:
        """rows: (ref, customer_id, kind, points, balance_after, occurred_at, recorded_at, lot_id, order_id,
        redemption_id, data, debt_change), in the order they happened."""
        if not rows:
            return
        names = ("ref", "c", "k", "p", "b", "o", "r", "l", "oi", "ri", "d", "dc", "n")
        await self._write(
            "INSERT INTO ledger (ref, customer_id, kind, points, balance_after, occurred_at, recorded_at, lot_id, "
            "order_id, redemption_id, data, debt_change) "
            "SELECT ref, c, k, p, b, o, r, l, oi, ri, CAST(d AS jsonb), dc FROM json_to_recordset(CAST(:rows AS json)) "
            "AS t(ref text, c text, k text, p numeric, b numeric, o timestamptz, r timestamptz, l text, oi text, "
            "ri text, d json, dc numeric, n int) ORDER BY n",
            {"rows": _json_rows(names, [(*r, i) for i, r in enumerate(rows)])},
        )

    async def ledger_by_ref(self, ref: str) -> Any:
        return (
            await self._exec(
                "SELECT seq, ref, customer_id, kind, points, balance_after, data FROM ledger WHERE ref = :r",
                {"r": ref},
            )
        ).first()

    async def ledger_page(self, customer_id: str, *, before: int | None, limit: int) -> list[Any]:
        result = await self._exec(
            "SELECT seq, ref, kind, points, balance_after, occurred_at, recorded_at, lot_id, order_id, redemption_id, "
            "data, debt_change FROM ledger WHERE customer_id = :c AND (CAST(:before AS bigint) IS NULL OR seq < :before) "
            "ORDER BY seq DESC LIMIT :limit",
            {"c": customer_id, "before": before, "limit": limit},
        )
        return list(result.all())

    # -- purchases -------------------------------------------------------------------------------

    async def purchases_for(self, keys: Iterable[tuple[str, str]]) -> list[Any]:
        keys = list(keys)
        if not keys:
            return []
        # A join with unnest: the generic plan of `customer_id = ANY(:c) AND (...) IN (...)` scanned the whole
        # purchases table and compared every row with the array, so each batch cost more as history grew.
        result = await self._exec(
            f"SELECT {_prefixed('p', _PURCHASE_COLS)} FROM unnest(CAST(:c AS text[]), CAST(:o AS text[])) AS t(c, o) "
            "JOIN purchases p ON p.customer_id = t.c AND p.order_id = t.o",
            {"c": _col(keys, 0), "o": _col(keys, 1)},
        )
        return list(result.all())

    async def insert_purchases(self, rows: list[tuple[Any, ...]]) -> None:
        """rows in the order of _PURCHASE_COLS."""
        if not rows:
            return
        names = ("c", "o", "m", "t", "tot", "paid", "ref", "acc", "rev", "rid", "red", "ret", "rec")
        await self._write(
            f"INSERT INTO purchases ({_PURCHASE_COLS}) SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS "
            "t(c text, o text, m text, t timestamptz, tot numeric, paid numeric, ref numeric, acc numeric, "
            "rev numeric, rid text, red numeric, ret numeric, rec text)",
            {"rows": _json_rows(names, rows)},
        )

    async def update_purchases(self, rows: list[tuple[Any, ...]]) -> None:
        """rows: (customer_id, order_id, refunded, points_reversed, points_returned)."""
        if not rows:
            return
        await self._write(
            "UPDATE purchases p SET refunded = t.ref, points_reversed = t.rev, points_returned = t.ret "
            "FROM unnest(CAST(:c AS text[]), CAST(:o AS text[]), CAST(:ref AS numeric[]), CAST(:rev AS numeric[]), "
            "CAST(:ret AS numeric[])) AS t(c, o, ref, rev, ret) WHERE p.customer_id = t.c AND p.order_id = t.o "
            "AND p.customer_id = ANY(CAST(:c AS text[]))",
            {n: _col(rows, i) for i, n in enumerate(("c", "o", "ref", "rev", "ret"))},
        )

    # -- redemptions -----------------------------------------------------------------------------

    async def get_redemptions(self, ids: list[str]) -> list[Any]:
        if not ids:
            return []
        result = await self._exec(
            f"SELECT {_REDEMPTION_COLS}, l.balance_after FROM redemptions r "
            "LEFT JOIN ledger l ON l.ref = 'redemption:' || r.redemption_id "
            "WHERE r.redemption_id = ANY(CAST(:ids AS text[]))",
            {"ids": ids},
        )
        return list(result.all())

    async def insert_redemption(self, values: dict[str, Any]) -> bool:
        """Insert a redemption unless its id exists (then False: the caller compares bodies)."""
        result = await self._exec(
            "INSERT INTO redemptions (redemption_id, customer_id, request_hash, check_amount, points_requested, "
            "points_applied, money_applied, status, order_id, store_id, created_at) VALUES (:redemption_id, "
            ":customer_id, :request_hash, :check_amount, :points_requested, :points_applied, :money_applied, "
            "'applied', :order_id, :store_id, :created_at) ON CONFLICT (redemption_id) DO NOTHING RETURNING 1",
            values,
        )
        return result.first() is not None

    async def redeem_new(self, values: tuple[Any, ...]) -> Any:
        """A new redemption in one statement (migration 0003's `loyalty_redeem`): the row
        (points_applied, money_applied, balance_after), or None when the general path must answer.

        Sent on the session's own asyncpg connection as a prepared statement: the hot path skips SQLAlchemy's
        statement handling. The call is one statement, so it is atomic on its own; inside the session's
        transaction when one is open. Its outbox row is published at the relay's next poll (at most
        poll_interval later): not waking the relay per request lets it publish in batches under load.
        """
        conn = await self.session.connection()
        raw = (await conn.get_raw_connection()).driver_connection
        return await raw.fetchrow(_REDEEM_SQL, *values)

    async def update_redemptions(self, rows: list[tuple[Any, ...]]) -> None:
        """rows: (redemption_id, status, points_returned, order_id, settled_at, cancelled_at)."""
        if not rows:
            return
        await self._write(
            "UPDATE redemptions r SET status = t.s, points_returned = t.ret, order_id = t.o, settled_at = t.sa, "
            "cancelled_at = t.ca FROM unnest(CAST(:id AS text[]), CAST(:s AS text[]), CAST(:ret AS numeric[]), "
            "CAST(:o AS text[]), CAST(:sa AS timestamptz[]), CAST(:ca AS timestamptz[])) AS t(id, s, ret, o, sa, ca) "
            "WHERE r.redemption_id = t.id AND r.redemption_id = ANY(CAST(:id AS text[]))",
            {n: _col(rows, i) for i, n in enumerate(("id", "s", "ret", "o", "sa", "ca"))},
        )

    async def redemption_lots(self, redemption_id: str) -> list[Any]:
        result = await self._exec(
            "SELECT rl.lot_id, rl.points, rl.returned FROM redemption_lots rl JOIN lots ON lots.id = rl.lot_id "
            "WHERE rl.redemption_id = :r ORDER BY lots.expires_at DESC, lots.id DESC",
            {"r": redemption_id},
        )
        return list(result.all())

    async def upsert_redemption_lots(self, rows: list[tuple[str, str, Decimal, Decimal]]) -> None:
        """rows: (redemption_id, lot_id, points, returned): the final state of each allocation."""
        if not rows:
            return
        await self._write(
            "INSERT INTO redemption_lots (redemption_id, lot_id, points, returned) "
            "SELECT * FROM unnest(CAST(:r AS text[]), CAST(:l AS text[]), CAST(:p AS numeric[]), CAST(:x AS numeric[])) "
            "ON CONFLICT (redemption_id, lot_id) DO UPDATE SET points = EXCLUDED.points, returned = EXCLUDED.returned",
            {n: _col(rows, i) for i, n in enumerate(("r", "l", "p", "x"))},
        )

    # -- goals -----------------------------------------------------------------------------------

    async def active_goals(self, ids: list[str]) -> list[Any]:
        # A join with unnest, not `= ANY(:ids)`: a generic plan would compare every row with the whole array.
        result = await self._exec(
            f"SELECT {_prefixed('g', _GOAL_COLS)} FROM unnest(CAST(:ids AS text[])) AS t(c) "
            "JOIN goals g ON g.customer_id = t.c AND g.status = 'active'",
            {"ids": ids},
        )
        return list(result.all())

    async def goals_of(self, customer_id: str) -> list[Any]:
        result = await self._exec(
            f"SELECT {_GOAL_COLS} FROM goals WHERE customer_id = :c ORDER BY assigned_at DESC LIMIT 20",
            {"c": customer_id},
        )
        return list(result.all())

    async def insert_goal(self, values: dict[str, Any]) -> bool:
        result = await self._exec(
            "INSERT INTO goals (id, customer_id, segment_key, target, progress, reward, status, assigned_at, due_at) "
            "VALUES (:id, :customer_id, :segment_key, :target, 0, :reward, 'active', :assigned_at, :due_at) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            values,
        )
        return result.first() is not None

    async def update_goals(self, rows: list[tuple[str, int, str, datetime | None]]) -> None:
        """rows: (id, progress, status, closed_at)."""
        if not rows:
            return
        await self._write(
            "UPDATE goals g SET progress = t.p, status = t.s, closed_at = t.ca FROM unnest(CAST(:id AS text[]), "
            "CAST(:p AS int[]), CAST(:s AS text[]), CAST(:ca AS timestamptz[])) AS t(id, p, s, ca) WHERE g.id = t.id "
            "AND g.id = ANY(CAST(:id AS text[]))",
            {n: _col(rows, i) for i, n in enumerate(("id", "p", "s", "ca"))},
        )
