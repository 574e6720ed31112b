"""Coupons: issued with a `requested` decision, validated and redeemed at the POS, rolled back.

A coupon is created in the transaction of its decision and `MessageRequested` (one per decision,
unique by message id: a redelivery finds the code it already has). Redemption locks the coupon's
row, so of concurrent redemptions of one code the ones over `max_uses` are refused; a redemption is
unique per (code, order_id), so the same order redeeming again (by the API or by its purchase
event) answers the stored result and counts once. A roll back (explicit, or the order's refund on
crm.events.v1) gives the use back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import EventMessage
from crm_common.db import driver_connection
from offers import codes
from offers.errors import CouponNotFound, CouponRefused, RedemptionNotFound
from offers.schemas import Offer

log = logging.getLogger(__name__)
CENT = Decimal("0.01")
ISSUE_ATTEMPTS = 5

_COUPON_COLS = (
    "c.code, c.message_id, c.campaign_id, c.version, c.customer_id, c.kind, c.value, c.multiplier, c.target, "
    "c.target_skus, c.target_category, c.min_basket, c.min_quantity, c.max_uses, c.max_uses_per_customer, c.uses, "
    "c.valid_from, c.valid_until, c.created_at"
)
_REDEMPTION_COLS = (
    "code, order_id, customer_id, campaign_id, version, discount, order_total, applies_to, redeemed_at, "
    "rolled_back_at, source"
)

ISSUE_SQL = """
INSERT INTO coupons (code, message_id, campaign_id, version, customer_id, kind, value, multiplier, target,
    target_skus, target_category, min_basket, min_quantity, max_uses, max_uses_per_customer, uses,
    valid_from, valid_until, created_at)
SELECT x.code, x.message_id, x.campaign_id, x.version, x.customer_id, x.kind, x.value, x.multiplier, x.target,
    coalesce(x.target_skus, '{}'), x.target_category, x.min_basket, x.min_quantity, x.max_uses,
    x.max_uses_per_customer, 0, x.valid_from, x.valid_until, CAST(:now AS timestamptz)
FROM json_to_recordset(CAST(:rows AS json)) AS x(code text, message_id text, campaign_id text, version int,
    customer_id text, kind text, value numeric, multiplier numeric, target text, target_skus text[],
    target_category text, min_basket numeric, min_quantity int, max_uses int, max_uses_per_customer int,
    valid_from timestamptz, valid_until timestamptz)
ON CONFLICT DO NOTHING
RETURNING message_id, code
"""

# The coupon, locked. This order's redemption is read by the next statement: one joined here would come
# from the snapshot taken before the lock was granted, and miss a redemption committed meanwhile.
COUPON_SQL = f"SELECT {_COUPON_COLS} FROM coupons c WHERE c.code = $1"
LOCK_SQL = COUPON_SQL + " FOR UPDATE OF c"
REDEMPTIONS_SQL = (
    f"SELECT {_REDEMPTION_COLS.replace('applies_to', 'applies_to::text AS applies_to')} FROM coupon_redemptions "
    "WHERE code = $1 AND ($2::text IS NULL OR order_id = $2) ORDER BY id"
)
CUSTOMER_USES_SQL = (
    "SELECT count(*) FROM coupon_redemptions WHERE campaign_id = $1 AND customer_id = $2 AND rolled_back_at IS NULL"
)
ROLLBACK_SQL = """
WITH rb AS (UPDATE coupon_redemptions SET rolled_back_at = $3 WHERE code = $1 AND order_id = $2
    AND rolled_back_at IS NULL RETURNING 1)
UPDATE coupons SET uses = uses - (SELECT count(*) FROM rb) WHERE code = $1
"""

APPLY_SQL = """
WITH red AS (
    INSERT INTO coupon_redemptions (code, campaign_id, version, customer_id, order_id, discount, order_total,
        applies_to, redeemed_at, source)
    VALUES ($1, $2, $3, $4, $5, $6, $7, CAST($8::text AS jsonb), $9, $10)
    ON CONFLICT (code, order_id) DO UPDATE SET rolled_back_at = NULL, redeemed_at = excluded.redeemed_at,
        discount = excluded.discount, order_total = excluded.order_total, applies_to = excluded.applies_to,
        source = excluded.source
    WHERE coupon_redemptions.rolled_back_at IS NOT NULL
    RETURNING 1
)
UPDATE coupons SET uses = uses + (SELECT count(*) FROM red) WHERE code = $1
"""


@dataclass(slots=True)
class Applied:
    """What a coupon gives a basket."""

    discount: Decimal
    free_delivery: bool
    multiplier: Decimal | None
    applies_to: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Line:
    sku: str
    category: str | None
    quantity: Decimal
    price: Decimal

    @property
    def amount(self) -> Decimal:
        return self.quantity * self.price


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def money(value: Any) -> Decimal | None:
    """Cents, or 4 places when the amount has them: the same text for a fresh answer and a replay."""
    if value is None:
        return None
    value = Decimal(str(value))
    cents = value.quantize(CENT)
    return cents if cents == value else value.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def resolve_target(offer: Offer, variables: dict[str, Any]) -> tuple[str, list[str], str | None]:
    """(target, target_skus, target_category) of the coupon: the personalised product or category as the
    message named it, so the coupon gives what the message promised."""
    if offer.target == "skus":
        return "skus", list(offer.skus), None
    if offer.target == "favourite_product":
        sku = str(variables.get("product_sku") or "")
        if sku:
            return "skus", [sku], None
    if offer.target in ("favourite_product", "favourite_category"):
        category = offer.category or str(variables.get("category") or "")
        if category:
            return "category", [], category
    return "basket", [], None


def issues_coupon(offer: Offer) -> bool:
    return offer.coupon and offer.kind != "info"


async def issue(session: AsyncSession, specs: list[dict[str, Any]], now: datetime) -> dict[str, str]:
    """Create one coupon per spec (a `requested` decision); return message id -> code.

    A spec: message_id, campaign_id, version, customer_id, at (the decision's moment), offer (Offer),
    variables (the message's, for the resolved target). A message id that has a coupon already keeps it.
    """
    if not specs:
        return {}
    pending = {s["message_id"]: s for s in specs}
    found: dict[str, str] = {}
    for _ in range(ISSUE_ATTEMPTS):
        rows = []
        for s in pending.values():
            offer: Offer = s["offer"]
            target, skus, category = resolve_target(offer, s["variables"])
            rows.append(
                {
                    "code": codes.generate(offer.coupon_pattern),
                    "message_id": s["message_id"],
                    "campaign_id": s["campaign_id"],
                    "version": s["version"],
                    "customer_id": s["customer_id"],
                    "kind": offer.kind,
                    "value": offer.value,
                    "multiplier": offer.multiplier,
                    "target": target,
                    "target_skus": skus,
                    "target_category": category,
                    "min_basket": offer.min_basket,
                    "min_quantity": offer.min_quantity,
                    "max_uses": offer.max_uses,
                    "max_uses_per_customer": offer.max_uses_per_customer,
                    "valid_from": s["at"],
                    "valid_until": s["at"] + timedelta(days=offer.validity_days),
                }
            )
        result = await session.execute(text(ISSUE_SQL), {"rows": _json(rows), "now": now})
        for m, code in result.all():
            found[m] = code
            pending.pop(m, None)
        if pending:
            # Redelivered decisions have their coupon already; the rest met a code taken (or drawn twice).
            existing = await session.execute(
                text("SELECT message_id, code FROM coupons WHERE message_id = ANY(:m)"), {"m": list(pending)}
            )
            for m, code in existing.all():
                found[m] = code
                pending.pop(m, None)
        if not pending:
            return found
    raise RuntimeError(f"could not draw a free coupon code for {len(pending)} decisions in {ISSUE_ATTEMPTS} tries")


# --- Rules ----------------------------------------------------------------------------------------


def _refusal(c: dict[str, Any], reason: str, message: str) -> CouponRefused:
    return CouponRefused(reason, message, c["code"])


def check(
    c: dict[str, Any],
    *,
    customer_id: str,
    lines: list[Line],
    order_total: Decimal | None,
    at: datetime,
    customer_uses: int,
    delivery_cost: Decimal,
) -> Applied:
    """What the coupon gives this basket, or CouponRefused with the first reason it does not."""
    if c["customer_id"] != customer_id:
        raise _refusal(c, "other_customer", "the coupon belongs to another customer")
    if at < c["valid_from"]:
        raise _refusal(c, "not_yet_valid", f"the coupon is valid from {c['valid_from'].isoformat()}")
    if at >= c["valid_until"]:
        raise _refusal(c, "expired", f"the coupon expired at {c['valid_until'].isoformat()}")
    if c["uses"] >= c["max_uses"]:
        raise _refusal(c, "used", f"the coupon was used {c['uses']} of {c['max_uses']} times")
    limit = c["max_uses_per_customer"]
    if limit is not None and customer_uses >= limit:
        raise _refusal(c, "customer_limit", f"the customer redeemed this campaign {customer_uses} of {limit} times")
    basket = order_total if order_total is not None else sum((x.amount for x in lines), Decimal(0))
    if c["min_basket"] is not None and basket < c["min_basket"]:
        raise _refusal(c, "minimum_basket", f"the basket {basket:f} is below the minimum {c['min_basket']:f}")
    if c["target"] == "skus":
        skus = set(c["target_skus"])
        hits = [x for x in lines if x.sku in skus]
    elif c["target"] == "category":
        want = (c["target_category"] or "").casefold()
        hits = [x for x in lines if (x.category or "").casefold() == want]
    else:
        hits = list(lines)
    if not hits:
        what = ", ".join(c["target_skus"]) if c["target"] == "skus" else c["target_category"]
        raise _refusal(c, "not_applicable", f"no line of the basket is one the coupon applies to ({what})")
    if c["min_quantity"] is not None and sum((x.quantity for x in hits), Decimal(0)) < c["min_quantity"]:
        raise _refusal(c, "minimum_quantity", f"the coupon needs at least {c['min_quantity']} of its items")
    return _discount(c, hits, delivery_cost)


def _discount(c: dict[str, Any], hits: list[Line], delivery_cost: Decimal) -> Applied:
    kind = c["kind"]
    shares: list[Decimal]
    if kind == "percent":
        shares = [_cents(x.amount * c["value"] / 100) for x in hits]
    elif kind == "fixed":
        total = sum((x.amount for x in hits), Decimal(0))
        give = min(c["value"], total).quantize(CENT, rounding=ROUND_DOWN)
        shares = [(give * x.amount / total).quantize(CENT, rounding=ROUND_DOWN) if total else Decimal(0) for x in hits]
        # What rounding down left goes to the lines that still have room, largest first.
        rest = give - sum(shares, Decimal(0))
        for i in sorted(range(len(hits)), key=lambda i: hits[i].amount, reverse=True):
            if rest <= 0:
                break
            room = hits[i].amount - shares[i]
            take = min(room.quantize(CENT, rounding=ROUND_DOWN), rest)
            shares[i] += take
            rest -= take
    else:
        shares = [Decimal(0)] * len(hits)
    applies = [
        {"sku": x.sku, "amount": money(x.amount), "discount": money(s)} for x, s in zip(hits, shares, strict=True)
    ]
    discount = sum(shares, Decimal(0))
    free = kind == "free_delivery"
    if free:
        discount = delivery_cost
    return Applied(
        discount=discount,
        free_delivery=free,
        multiplier=c["multiplier"] if kind == "points_multiplier" else None,
        applies_to=applies,
    )


# --- Reads ----------------------------------------------------------------------------------------


async def _raw(session: AsyncSession) -> Any:
    """The session's asyncpg connection: the POS path skips SQLAlchemy's statement handling (its CPU per
    statement is most of a request's). Inside the session's transaction when one is open."""
    return await driver_connection(session)


async def _coupon(raw: Any, code: str, *, lock: bool = False) -> dict[str, Any]:
    found = await raw.fetchrow(LOCK_SQL if lock else COUPON_SQL, code)
    if found is None:
        raise CouponNotFound(code)
    return dict(found)


async def _customer_uses(raw: Any, c: dict[str, Any], *, lock: bool) -> int:
    """The customer's live redemptions of the campaign (under a transaction lock when redeeming, so two
    codes of one campaign redeemed at once cannot both pass the per-customer limit)."""
    if c["max_uses_per_customer"] is None:
        return 0
    if lock:
        await raw.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"coupons:{c['campaign_id']}:{c['customer_id']}"
        )
    return int(await raw.fetchval(CUSTOMER_USES_SQL, c["campaign_id"], c["customer_id"]))


def state_of(c: dict[str, Any], now: datetime) -> str:
    if c["uses"] >= c["max_uses"]:
        return "used"
    if now >= c["valid_until"]:
        return "expired"
    if now < c["valid_from"]:
        return "not_yet_valid"
    return "active"


def _redemption_read(r: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    return {
        **r,
        "discount": money(r["discount"]),
        "order_total": money(r["order_total"]),
        "applies_to": [{**a, "amount": money(a["amount"]), "discount": money(a["discount"])} for a in r["applies_to"]],
        "kind": c["kind"],
        "free_delivery": c["kind"] == "free_delivery",
        "multiplier": c["multiplier"] if c["kind"] == "points_multiplier" else None,
        "state": "rolled_back" if r["rolled_back_at"] else "applied",
    }


async def _redemptions(raw: Any, code: str, order_id: str | None = None) -> list[dict[str, Any]]:
    rows = await raw.fetch(REDEMPTIONS_SQL, code, order_id)
    return [{**dict(r), "applies_to": orjson.loads(r["applies_to"])} for r in rows]


async def get(session: AsyncSession, code: str, now: datetime) -> dict[str, Any]:
    raw = await _raw(session)
    c = await _coupon(raw, code)
    return {
        **c,
        "state": state_of(c, now),
        "redemptions": [_redemption_read(r, c) for r in await _redemptions(raw, code)],
    }


async def of_customer(session: AsyncSession, customer_id: str, now: datetime, limit: int) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(f"SELECT {_COUPON_COLS} FROM coupons c WHERE c.customer_id = :k ORDER BY c.created_at DESC LIMIT :n"),
        {"k": customer_id, "n": limit},
    )
    return [{**dict(c), "state": state_of(dict(c), now)} for c in rows.mappings()]


# --- POS ------------------------------------------------------------------------------------------


def lines_of(lines: list[Any]) -> list[Line]:
    return [Line(sku=x.sku, category=x.category, quantity=x.quantity, price=x.price) for x in lines]


async def validate(
    session: AsyncSession,
    *,
    code: str,
    customer_id: str,
    lines: list[Line],
    order_total: Decimal | None,
    now: datetime,
    delivery_cost: Decimal,
) -> dict[str, Any]:
    """Whether the coupon applies to this basket now, and what it gives; nothing is written."""
    raw = await _raw(session)
    c = await _coupon(raw, code)
    out: dict[str, Any] = {"code": c["code"], "kind": c["kind"], "valid_until": c["valid_until"]}
    try:
        applied = check(
            c,
            customer_id=customer_id,
            lines=lines,
            order_total=order_total,
            at=now,
            customer_uses=await _customer_uses(raw, c, lock=False) if c["customer_id"] == customer_id else 0,
            delivery_cost=delivery_cost,
        )
    except CouponRefused as refused:
        return {**out, "valid": False, "reason": refused.code, "message": refused.message}
    return {
        **out,
        "valid": True,
        "discount": money(applied.discount),
        "free_delivery": applied.free_delivery,
        "multiplier": applied.multiplier,
        "applies_to": applied.applies_to,
    }


async def _locked(raw: Any, code: str, order_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The coupon (row-locked until the transaction ends) and this order's redemption of it."""
    c = await _coupon(raw, code, lock=True)
    found = await _redemptions(raw, code, order_id)
    return c, (found[0] if found else None)


async def redeem(
    session: AsyncSession,
    *,
    code: str,
    customer_id: str,
    order_id: str,
    lines: list[Line],
    order_total: Decimal | None,
    at: datetime,
    source: str,
    delivery_cost: Decimal,
) -> dict[str, Any]:
    """Apply the coupon to the order, once: the same order again answers what it got the first time.

    A rolled-back redemption of the same order is applied again by the API (the cashier re-applied
    the coupon), never by a purchase event.
    """
    raw = await _raw(session)
    # Its own transaction, or a savepoint inside the session's (a consumer batch): the row lock lasts
    # until the redemption is written, and a refusal leaves nothing behind.
    async with raw.transaction():
        c, existing = await _locked(raw, code, order_id)
        if c["customer_id"] != customer_id:
            raise _refusal(c, "other_customer", "the coupon belongs to another customer")
        if existing is not None and (existing["rolled_back_at"] is None or source == "event"):
            return _redemption_read(existing, c)
        applied = check(
            c,
            customer_id=customer_id,
            lines=lines,
            order_total=order_total,
            at=at,
            customer_uses=await _customer_uses(raw, c, lock=True),
            delivery_cost=delivery_cost,
        )
        total = order_total if order_total is not None else sum((x.amount for x in lines), Decimal(0))
        await raw.execute(
            APPLY_SQL,
            code,
            c["campaign_id"],
            c["version"],
            customer_id,
            order_id,
            applied.discount,
            total,
            _json(applied.applies_to),
            at,
            source,
        )
    return _redemption_read(
        {
            "code": code,
            "order_id": order_id,
            "customer_id": customer_id,
            "campaign_id": c["campaign_id"],
            "version": c["version"],
            "discount": applied.discount,
            "order_total": total,
            "applies_to": applied.applies_to,
            "redeemed_at": at,
            "rolled_back_at": None,
            "source": source,
        },
        c,
    )


async def rollback(session: AsyncSession, *, code: str, order_id: str, now: datetime) -> dict[str, Any]:
    """Undo the order's redemption of the coupon (idempotent: a second roll back changes nothing)."""
    raw = await _raw(session)
    async with raw.transaction():
        c, existing = await _locked(raw, code, order_id)
        if existing is None:
            raise RedemptionNotFound(code, order_id)
        if existing["rolled_back_at"] is None:
            await raw.execute(ROLLBACK_SQL, code, order_id, now)
            existing["rolled_back_at"] = now
    return _redemption_read(existing, c)


async def rollback_orders(session: AsyncSession, refunds: list[dict[str, Any]], now: datetime) -> int:
    """Roll back every live redemption of the refunded orders ({"o": order_id, "k": customer_id})."""
    if not refunds:
        return 0
    params = {"r": _json(refunds), "now": now}
    # The coupons first, in one order (as a redemption locks them): no deadlock with the POS.
    await session.execute(
        text(
            "SELECT c.code FROM coupons c WHERE c.code IN (SELECT r.code FROM coupon_redemptions r "
            "JOIN json_to_recordset(CAST(:r AS json)) AS x(o text, k text) ON r.order_id = x.o AND r.customer_id = x.k "
            "WHERE r.rolled_back_at IS NULL) ORDER BY c.code FOR UPDATE OF c"
        ),
        params,
    )
    result = await session.execute(
        text(
            "WITH rb AS (UPDATE coupon_redemptions r SET rolled_back_at = CAST(:now AS timestamptz) "
            "FROM json_to_recordset(CAST(:r AS json)) AS x(o text, k text) "
            "WHERE r.order_id = x.o AND r.customer_id = x.k AND r.rolled_back_at IS NULL RETURNING r.code), "
            "n AS (SELECT code, count(*) AS n FROM rb GROUP BY code) "
            "UPDATE coupons c SET uses = c.uses - n.n FROM n WHERE c.code = n.code RETURNING n.n"
        ),
        params,
    )
    return sum(int(n) for (n,) in result.all())


async def on_events(
    session: AsyncSession, events: list[EventMessage], now: datetime, delivery_cost: Decimal
) -> dict[str, int]:
    """crm.events.v1: a purchase carrying `coupon_code` redeems it for its order (source `event`, at the
    purchase's time, on its gross lines); a refund rolls back the order's redemptions. A coupon the
    purchase cannot redeem (unknown, another customer's, used, ...) is logged and skipped."""
    redeemed = refused = 0
    refunds = []
    for e in sorted(events, key=lambda e: e.occurred_at):
        if e.customer_id is None:
            continue
        p = e.properties
        if e.type == "refund" and p.get("order_id"):
            refunds.append({"o": str(p["order_id"]), "k": e.customer_id})
        if e.type != "purchase" or not p.get("coupon_code") or not p.get("order_id"):
            continue
        code = codes.normalise(str(p["coupon_code"]))
        if code is None:
            refused += 1
            continue
        try:
            lines = [
                Line(
                    sku=str(i["sku"]),
                    category=i.get("category"),
                    quantity=Decimal(str(i.get("quantity", 1))),
                    price=Decimal(str(i["unit_price"])),
                )
                for i in p.get("items") or []
            ]
            await redeem(
                session,
                code=code,
                customer_id=e.customer_id,
                order_id=str(p["order_id"]),
                lines=lines,
                order_total=None,
                at=e.occurred_at,
                source="event",
                delivery_cost=delivery_cost,
            )
            redeemed += 1
        except (CouponRefused, CouponNotFound) as exc:
            refused += 1
            log.info("purchase %s did not redeem coupon %s: %s", e.id, code, exc.code)
    rolled_back = await rollback_orders(session, refunds, now)
    return {"redeemed": redeemed, "refused": refused, "rolled_back": rolled_back}
