"""Triggers: events and segment entries inside the consume loop, time in set-based sweeps.

Every path ends in `evaluation.decide_and_request`, one statement per batch (events, segment
entries, due timers) or per time-triggered campaign (sweeps) against all active campaigns.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.events import EventMessage
from crm_common.contract.messages import SegmentMembershipChanged
from offers import attribution, coupons
from offers.errors import PurchasesBehind
from offers.evaluation import Active, active_of, decide_and_request, ensure_profiles
from offers.peers import Peers
from offers.repository import (
    BIRTHDAY_CANDS,
    CANDS_FROM_JSON,
    INACTIVITY_CANDS,
    SCHEDULE_CANDS,
    WINDOW_CANDS,
    OffersRepository,
)
from offers.schemas import Birthday, EventTrigger, Inactivity, NoPurchaseAfter, PurchaseWindow, Schedule
from offers.settings import Settings


def event_matches(trigger: EventTrigger, event: EventMessage) -> bool:
    """The event's type (and custom name) is the trigger's and every property filter holds.

    A filter on a property the event lacks looks into its items (a cart's or a purchase's), so
    `{"category": "shoes"}` matches a product view of shoes and a cart holding shoes alike.
    """
    if event.type != trigger.event_type:
        return False
    props = event.properties
    if trigger.event_type == "custom" and props.get("name") != trigger.name:
        return False
    for key, want in trigger.properties.items():
        wants = {str(w) for w in (want if isinstance(want, list) else [want])}
        have = props.get(key)
        if have is None:
            items = props.get("items")
            if not isinstance(items, list) or not any(isinstance(i, dict) and str(i.get(key)) in wants for i in items):
                return False
        elif str(have) not in wants:
            return False
    return True


class EventIndex:
    """Event-triggered campaigns by event type and by the value of one filtered property, so an event
    is checked only against the campaigns it could match (50 campaigns x 5,000 events/s)."""

    def __init__(self, campaigns: list[Active]) -> None:
        self.keyed: dict[str, dict[str, dict[str, list[Active]]]] = {}
        self.scan: dict[str, list[Active]] = {}
        for c in campaigns:
            trig = c.definition.trigger
            assert isinstance(trig, EventTrigger)
            filters = dict(trig.properties)
            if trig.event_type == "custom":
                filters.setdefault("name", trig.name or "")
            if not filters:
                self.scan.setdefault(trig.event_type, []).append(c)
                continue
            key, want = next(iter(filters.items()))
            by_value = self.keyed.setdefault(trig.event_type, {}).setdefault(key, {})
            for value in want if isinstance(want, list) else [want]:
                by_value.setdefault(str(value), []).append(c)

    def matching(self, event: EventMessage) -> list[Active]:
        """The campaigns whose trigger the event satisfies."""
        found: dict[str, Active] = {c.id: c for c in self.scan.get(event.type, ())}
        props = event.properties
        for key, by_value in self.keyed.get(event.type, {}).items():
            have = props.get(key)
            if have is not None:
                values = {str(have)}
            elif isinstance(props.get("items"), list):
                values = {str(i.get(key)) for i in props["items"] if isinstance(i, dict)}
            else:
                continue
            for value in values:
                for c in by_value.get(value, ()):
                    found[c.id] = c
        return [
            c
            for c in found.values()
            if event_matches(c.definition.trigger, event)  # type: ignore[arg-type]
        ]


def _items_of(event: EventMessage) -> list[dict[str, Any]]:
    p = event.properties
    if event.type == "product_viewed":
        return [{k: p.get(k) for k in ("sku", "name", "category", "price") if p.get(k) is not None}]
    items = p.get("items")
    if isinstance(items, list):
        keep = ("sku", "name", "category", "quantity", "unit_price", "size", "color")
        return [{k: i.get(k) for k in keep if i.get(k) is not None} for i in items[:20] if isinstance(i, dict)]
    return []


def _facts(
    events: list[EventMessage],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per customer: the traits the events carried (last one wins) and purchases; the purchase times;
    the purchased quantities per SKU."""
    facts: dict[str, dict[str, Any]] = {}
    purchases = []
    bought: dict[tuple[str, str], dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e.occurred_at):
        if e.customer_id is None:
            continue
        f = facts.setdefault(e.customer_id, {"k": e.customer_id, "purchases": 0})
        if e.type == "customer_updated":
            for field in ("first_name", "timezone", "birth_date"):
                if field in e.properties:
                    f[field] = e.properties[field]
                    f[f"set_{field}"] = True
        elif e.type == "purchase":
            f["purchases"] += 1
            at = e.occurred_at.isoformat()
            f["last_purchase_at"] = max(f.get("last_purchase_at") or at, at)
            purchases.append({"k": e.customer_id, "at": e.occurred_at})
            for item in e.properties.get("items") or ():
                if not isinstance(item, dict) or not item.get("sku"):
                    continue
                row = bought.setdefault(
                    (e.customer_id, item["sku"]),
                    {"k": e.customer_id, "sku": item["sku"], "q": Decimal(0), "at": at},
                )
                row["q"] += Decimal(str(item.get("quantity") or 1))
                row["at"] = max(row["at"], at)
                for field in ("name", "category", "size", "color"):
                    if item.get(field) is not None:
                        row[field] = item[field]
    return list(facts.values()), purchases, list(bought.values())


async def on_events(
    *,
    session: AsyncSession,
    events: list[EventMessage],
    campaigns: list[Active],
    peers: Peers,
    now: datetime,
    settings: Settings,
) -> int:
    """Keep customer facts, start and cancel abandonment timers, and decide the event triggers."""
    repo = OffersRepository(session)
    facts, purchases, bought = _facts(events)
    # Only customers with a trait or a purchase in the batch: a product view changes nothing here.
    await repo.upsert_customer_facts([x for x in facts if len(x) > 2 or x["purchases"]], now)
    await repo.add_purchased_items(bought)
    await attribution.record_purchases(session, events, now)
    await coupons.on_events(session, events, now, settings.delivery_cost)  # coupon_code redeems, refund rolls back
    running = [c for c in campaigns if c.running(now)]
    immediate = [c for c in running if c.kind == "event"]
    waits = [c for c in running if c.kind == "no_purchase_after"]
    index = EventIndex(immediate + waits)
    cands: list[dict[str, Any]] = []
    timers: dict[tuple[str, str], dict[str, Any]] = {}
    emptied_carts = []
    for e in events:
        if e.customer_id is None:
            continue
        if e.type == "cart_updated" and not e.properties.get("items"):
            emptied_carts.append({"k": e.customer_id, "at": e.occurred_at})
        for c in index.matching(e):
            trig = c.definition.trigger
            if isinstance(trig, NoPurchaseAfter):
                # Several matching events of one customer in a batch: one timer, all their items.
                if (c.id, e.customer_id) in timers:
                    timers[(c.id, e.customer_id)]["ctx"]["items"].extend(_items_of(e))
                    continue
                timers[(c.id, e.customer_id)] = {
                    "c": c.id,
                    "k": e.customer_id,
                    "o": e.id,
                    "v": c.version,
                    "priority": c.definition.limits.priority,
                    "at": e.occurred_at,
                    "due": e.occurred_at + timedelta(hours=trig.wait_hours),
                    "ctx": {"items": _items_of(e), "event_type": e.type},
                    "now": now,
                }
            else:
                cands.append({"c": c.id, "k": e.customer_id, "o": e.id, "at": e.occurred_at, "pre": None})
    # Timers start before purchases cancel them: a view and a later purchase in one batch cancel.
    await repo.start_timers(list(timers.values()))
    await repo.cancel_timers(purchases, now)
    cart_waits = [c.id for c in waits if c.definition.trigger.event_type == "cart_updated"]  # type: ignore[union-attr]
    if emptied_carts and cart_waits:
        await repo.cancel_timers(emptied_carts, now, campaign_ids=cart_waits)
    if not cands:
        return 0
    needy = {c.id for c in immediate if c.needs_profile}
    if needy:
        await ensure_profiles(
            session=session,
            peers=peers,
            customer_ids=sorted({str(x["k"]) for x in cands if x["c"] in needy}),
            now=now,
            settings=settings,
        )
    return await decide_and_request(
        session=session,
        campaigns=immediate,
        cand_sql=CANDS_FROM_JSON,
        params={"cands": orjson.dumps(cands, default=str).decode()},
        contexts=None,
        now=now,
        settings=settings,
    )


async def on_segments(
    *,
    session: AsyncSession,
    messages: list[SegmentMembershipChanged],
    campaigns: list[Active],
    peers: Peers,
    now: datetime,
    settings: Settings,
) -> int:
    """Keep digests and memberships, then decide the segment-entry triggers."""
    repo = OffersRepository(session)
    digests: dict[str, dict[str, Any]] = {}
    state: dict[tuple[str, str], tuple[bool, datetime]] = {}
    for m in sorted(messages, key=lambda m: m.occurred_at):
        digests[m.customer_id] = {
            "k": m.customer_id,
            "digest": m.profile.model_dump(mode="json", exclude_none=True),
            "at": m.occurred_at,
            "margin": None,
        }
        state[(m.customer_id, m.segment_key)] = (m.type == "segment.entered", m.occurred_at)
    await repo.upsert_digests(list(digests.values()), now)
    await repo.apply_memberships(
        [{"k": k, "s": s, "at": at} for (k, s), (inside, at) in state.items() if inside],
        [{"k": k, "s": s} for (k, s), (inside, _) in state.items() if not inside],
    )
    running = [c for c in campaigns if c.running(now) and c.kind == "segment_entered"]
    by_key: dict[str, list[Active]] = {}
    for c in running:
        by_key.setdefault(c.definition.trigger.segment_key, []).append(c)  # type: ignore[union-attr]
    cands = [
        {"c": c.id, "k": m.customer_id, "o": m.id, "at": m.occurred_at, "pre": None}
        for m in messages
        if m.type == "segment.entered"
        for c in by_key.get(m.segment_key, ())
    ]
    if not cands:
        return 0
    by_category = {c.id for c in running if c.definition.offer.category}
    if by_category:
        behind = await repo.behind_on_purchases(
            sorted({str(x["k"]) for x in cands if x["c"] in by_category}), now - timedelta(minutes=5)
        )
        if behind:
            raise PurchasesBehind(f"{len(behind)} customers' purchases not applied yet, e.g. {behind[0]!r}")
    needy = {c.id for c in running if c.needs_profile}
    if needy:
        await ensure_profiles(
            session=session,
            peers=peers,
            customer_ids=sorted({str(x["k"]) for x in cands if x["c"] in needy}),
            now=now,
            settings=settings,
        )
    return await decide_and_request(
        session=session,
        campaigns=running,
        cand_sql=CANDS_FROM_JSON,
        params={"cands": orjson.dumps(cands, default=str).decode()},
        contexts=None,
        now=now,
        settings=settings,
    )


def time_candidates(c: Active) -> tuple[str, dict[str, Any]] | None:
    """The candidate statement of a time-triggered campaign and its parameters."""
    t = c.definition.trigger
    base = {"cid": c.id}
    if isinstance(t, Inactivity):
        return INACTIVITY_CANDS, {**base, "days": t.days}
    if isinstance(t, PurchaseWindow):
        return WINDOW_CANDS, {**base, "min_days": t.min_days, "max_days": t.max_days}
    if isinstance(t, Schedule):
        return SCHEDULE_CANDS, {
            **base,
            "start": t.date,
            "t": t.local_time,
            "every": t.every_days,
            "until": t.until,
        }
    if isinstance(t, Birthday):
        return BIRTHDAY_CANDS, {**base, "days_before": t.days_before, "t": t.local_time}
    return None


async def run_time_triggers(session: AsyncSession, now: datetime, *, settings: Settings) -> dict[str, Any]:
    """Sweep: end campaigns past their end, then decide every time-triggered campaign (one statement each)."""
    repo = OffersRepository(session)
    ended = await repo.end_expired_campaigns(now)

    campaigns = [active_of(r) for r in await repo.active_campaigns()]
    requested = 0
    for c in campaigns:
        if not c.running(now):
            continue
        spec = time_candidates(c)
        if spec is None:
            continue
        sql, params = spec
        requested += await decide_and_request(
            session=session, campaigns=[c], cand_sql=sql, params=params, contexts=None, now=now, settings=settings
        )
    return {"requested": requested, "ended": ended}


async def run_timers(session: AsyncSession, now: datetime, *, settings: Settings) -> dict[str, Any]:
    """Sweep: fire due abandonment timers (a purchase after the timer started makes it `already_bought`)."""

    repo = OffersRepository(session)
    campaigns = [c for c in (active_of(r) for r in await repo.active_campaigns()) if c.kind == "no_purchase_after"]
    if not campaigns:
        return {"fired": 0, "requested": 0}
    due = await repo.claim_due_timers([c.id for c in campaigns], now, settings.sweep_batch)
    if not due:
        return {"fired": 0, "requested": 0}
    cands = [
        {
            "c": t["campaign_id"],
            "k": t["customer_id"],
            "o": t["occurrence"],
            "at": t["due_at"],
            "pre": "already_bought" if t["bought"] else None,
        }
        for t in due
    ]
    contexts = {(t["campaign_id"], t["customer_id"], t["occurrence"]): t["context"] for t in due}
    requested = await decide_and_request(
        session=session,
        campaigns=campaigns,
        cand_sql=CANDS_FROM_JSON,
        params={"cands": orjson.dumps(cands, default=str).decode()},
        contexts=contexts,
        now=now,
        settings=settings,
    )
    return {"fired": len(due), "requested": requested}
