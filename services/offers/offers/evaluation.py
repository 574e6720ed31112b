"""Evaluation: active campaigns as statement parameters, one decision statement per batch, then a
personalised MessageRequested per `requested` decision through the outbox."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import MessageRequested
from crm_common.outbox import enqueue_models
from offers import coupons
from offers.peers import Peers, digest_of_profile
from offers.repository import OffersRepository
from offers.schemas import CampaignDefinition
from offers.settings import TOPIC_MESSAGES, Settings


@dataclass(slots=True)
class Active:
    """An active campaign as the evaluators need it."""

    id: str
    version: int
    definition: CampaignDefinition

    @property
    def kind(self) -> str:
        return self.definition.trigger.kind

    def running(self, now: datetime) -> bool:
        lim = self.definition.limits
        return (lim.starts_at is None or lim.starts_at <= now) and (lim.ends_at is None or now < lim.ends_at)

    @property
    def needs_profile(self) -> bool:
        """Whether a decision reads profile fields that may be missing from the cache."""
        d = self.definition
        return d.offer.target in ("favourite_product", "favourite_category") or (
            d.offer.is_discount and d.economics.min_expected_margin is not None
        )


def active_of(row: dict[str, Any]) -> Active:
    return Active(id=row["id"], version=row["version"], definition=CampaignDefinition.model_validate(row["definition"]))


class CampaignCache:
    """Active campaigns, re-read at most every `ttl` seconds (an edit reaches every replica within it)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.value: list[Active] | None = None
        self.loaded_at = 0.0

    async def get(self, session: AsyncSession) -> list[Active]:
        if self.value is None or time.monotonic() - self.loaded_at > self.ttl:
            self.value = [active_of(r) for r in await OffersRepository(session).active_campaigns()]
            self.loaded_at = time.monotonic()
        return self.value

    def invalidate(self) -> None:
        self.value = None


def campaign_params(c: Active, settings: Settings) -> dict[str, Any]:
    """The campaign's rules as one row of the decision statement's `camps` parameter."""
    d = c.definition
    lim = d.limits
    return {
        "id": c.id,
        "version": c.version,
        "priority": lim.priority,
        "inc": d.audience.include_segments,
        "exc": d.audience.exclude_segments,
        "tiers": d.audience.tiers,
        "conds": [cond.model_dump(mode="json") for cond in d.audience.conditions],
        "control": d.control_share if d.control_share is not None else settings.default_control_share,
        "once": lim.once_per_customer,
        "cooldown_days": lim.cooldown_days,
        "collision_min": lim.collision_minutes
        if lim.collision_minutes is not None
        else settings.collision_window_minutes,
        "budget_n": lim.budget_messages,
        "budget_cost": str(lim.budget_cost) if lim.budget_cost is not None else None,
        "guard": d.offer.is_discount,
        "guard_tiers": d.economics.guard_tiers,
        "min_margin": str(d.economics.min_expected_margin) if d.economics.min_expected_margin is not None else None,
        "disc_kind": d.offer.kind,
        "disc_value": str(d.offer.value) if d.offer.value is not None else None,
        "min_basket": str(d.offer.min_basket) if d.offer.min_basket is not None else None,
        "channel": d.delivery.channel,
    }


def base_params(campaigns: list[Active], settings: Settings, now: datetime) -> dict[str, Any]:
    return {
        "camps": orjson.dumps([campaign_params(c, settings) for c in campaigns]).decode(),
        "now": now,
        "max_collision": max(
            [settings.collision_window_minutes] + [c.definition.limits.collision_minutes or 0 for c in campaigns]
        ),
        "gsalt": settings.global_control_salt,
        "gshare": settings.global_control_share,
        "delivery_cost": str(settings.delivery_cost),
        "batch": settings.sweep_batch,
        "tz": "UTC",
    }


def _fmt(value: Decimal | None) -> str:
    if value is None:
        return ""
    return f"{value.normalize():f}"


def personalise(
    *,
    definition: CampaignDefinition,
    digest: dict[str, Any] | None,
    first_name: str | None,
    context: dict[str, Any] | None,
    at: datetime,
    favourite: dict[str, Any] | None = None,
    loyalty: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The message's variables: the same names for every campaign, empty where a value is unknown.

    `favourite` is the customer's most bought product in the offer's category, when it names one.
    """
    digest = digest or {}
    offer = definition.offer
    fav = (favourite or {}) if offer.category else (digest.get("favourite_product") or {})
    product_name = product_sku = ""
    category = digest.get("favourite_category") or ""
    if offer.target == "favourite_product" and fav:
        product_name = fav.get("name") or fav.get("sku") or ""
        product_sku = fav.get("sku") or ""
        category = fav.get("category") or category
    elif offer.target == "skus":
        product_sku = ", ".join(offer.skus)
    items = list((context or {}).get("items") or [])[:20]
    if items and not product_name:
        product_name = items[0].get("name") or items[0].get("sku") or ""
        product_sku = product_sku or items[0].get("sku") or ""
        category = category or items[0].get("category") or ""
    if offer.kind == "percent":
        discount = f"{_fmt(offer.value)}%"
    elif offer.kind == "fixed":
        discount = _fmt(offer.value)
    elif offer.kind == "free_delivery":
        discount = "free delivery"
    elif offer.kind == "points_multiplier":
        discount = f"x{_fmt(offer.multiplier)} bonus points"
    else:
        discount = ""
    valid_until = (at + timedelta(days=offer.validity_days)).date().isoformat()
    return {
        "first_name": first_name or digest.get("first_name") or "",
        "campaign": definition.name,
        "offer_kind": offer.kind,
        "discount": discount,
        "product_name": product_name,
        "product_sku": product_sku,
        "category": category,
        "size": digest.get("favourite_size") or fav.get("size") or "",
        "color": digest.get("favourite_color") or fav.get("color") or "",
        "min_basket": _fmt(offer.min_basket),
        "min_quantity": offer.min_quantity or "",
        "multiplier": _fmt(offer.multiplier),
        # The stored code, filled by decide_and_request once coupons.issue has drawn it.
        "coupon_code": "",
        "valid_until": valid_until,
        "products": ", ".join(str(i.get("name") or i.get("sku")) for i in items),
        "items": items,
        "points_balance": _fmt((loyalty or {}).get("points_balance")),
        "loyalty_tier": (loyalty or {}).get("loyalty_tier") or "",
    }


async def ensure_profiles(
    *, session: AsyncSession, peers: Peers, customer_ids: list[str], now: datetime, settings: Settings
) -> int:
    """Read segmentation's profile for customers whose cached digest is missing or stale.

    Segmentation being down raises PeerUnavailable (a ConnectionError): the consume loop retries
    the batch with backoff, so an evaluation waits rather than being skipped.
    """
    repo = OffersRepository(session)
    needing = await repo.customers_needing_profile(
        customer_ids, now - timedelta(seconds=settings.profile_stale_after_s)
    )
    if not needing:
        return 0
    sem = asyncio.Semaphore(settings.profile_fetch_concurrency)

    async def one(k: str) -> dict[str, Any]:
        async with sem:
            profile = await peers.profile(k)
        if profile is None:
            return {"k": k, "digest": {}, "at": now, "margin": None}
        return {"k": k, "digest": digest_of_profile(profile), "at": now, "margin": profile.get("margin")}

    rows = await asyncio.gather(*(one(k) for k in needing))
    await repo.upsert_digests(rows, now)
    return len(rows)


async def decide_and_request(
    *,
    session: AsyncSession,
    campaigns: list[Active],
    cand_sql: str,
    params: dict[str, Any],
    contexts: dict[tuple[str, str, str], dict[str, Any]] | None,
    now: datetime,
    settings: Settings,
) -> int:
    """Decide every candidate against its campaign in one statement; request the messages; return how many."""
    if not campaigns:
        return 0
    repo = OffersRepository(session)
    await repo.lock_budgets(
        [c.id for c in campaigns if c.definition.limits.budget_messages or c.definition.limits.budget_cost]
    )
    rows = await repo.decide(cand_sql=cand_sql, params={**base_params(campaigns, settings, now), **params})
    if not rows:
        return 0
    by_id = {c.id: c for c in campaigns}
    favourites: dict[tuple[str, str], dict[str, Any]] = {}
    for cat in {c.definition.offer.category for c in campaigns if c.definition.offer.category}:
        ids = [r["customer_id"] for r in rows if by_id[r["campaign_id"]].definition.offer.category == cat]
        if ids:
            for k, product in (await repo.favourite_products(ids, cat)).items():
                favourites[(k, cat)] = product
    loyalty = await repo.loyalty_of([r["customer_id"] for r in rows])
    variables = []
    issued: list[dict[str, Any]] = []
    for r in rows:
        d = by_id[r["campaign_id"]].definition
        ctx = (contexts or {}).get((r["campaign_id"], r["customer_id"], r["occurrence"]))
        v = personalise(
            definition=d,
            digest=r["digest"],
            first_name=r["first_name"],
            context=ctx,
            at=r["at"],
            favourite=favourites.get((r["customer_id"], d.offer.category or "")),
            loyalty=loyalty.get(r["customer_id"]),
        )
        variables.append({"id": r["id"], "v": v})
        if coupons.issues_coupon(d.offer):
            issued.append(
                {
                    "message_id": r["message_id"],
                    "campaign_id": r["campaign_id"],
                    "version": r["version"],
                    "customer_id": r["customer_id"],
                    "at": r["at"],
                    "offer": d.offer,
                    "variables": v,
                }
            )
    # The coupons in the transaction of their decisions and messages: the message carries the stored code.
    drawn = await coupons.issue(session, issued, now)
    for spec in issued:
        spec["variables"]["coupon_code"] = drawn[spec["message_id"]]
    messages = []
    for r, v in zip(rows, (x["v"] for x in variables), strict=True):
        campaign = by_id[r["campaign_id"]]
        d = campaign.definition
        messages.append(
            MessageRequested(
                id=r["message_id"],
                customer_id=r["customer_id"],
                occurred_at=now,
                kind="marketing",
                template=d.delivery.template,
                channel=d.delivery.channel,
                locale=d.delivery.locale,
                variables=v,
                campaign_id=campaign.id,
                offer_id=f"{campaign.id}:v{r['version']}",
                expires_at=r["at"] + timedelta(days=d.offer.validity_days),
                source_service="offers",
            )
        )
    await enqueue_models(session, TOPIC_MESSAGES, messages)
    await repo.set_variables(variables)
    return len(messages)
