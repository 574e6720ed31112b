"""Campaign lifecycle: create, edit (a new version once active), activate, pause, resume, end; the
checks that refuse a definition that can never work; the dry-run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from offers.errors import CampaignNotFound, InvalidCampaign, InvalidTransition
from offers.evaluation import Active, base_params
from offers.peers import Peers
from offers.repository import ALL_CUSTOMERS_CANDS, SEGMENT_MEMBERS_CANDS, OffersRepository
from offers.schemas import OUTCOMES, CampaignDefinition, CampaignUpdate, Schedule, SegmentEntered
from offers.settings import Settings
from offers.triggers import time_candidates

# The earliest any time zone reaches a local wall-clock time is 14 h before UTC, the latest 12 h after.
LATEST_OFFSET = timedelta(hours=12)

TRANSITIONS = {
    "activate": ({"draft"}, "active"),
    "pause": ({"active"}, "paused"),
    "resume": ({"paused"}, "active"),
    "end": ({"draft", "active", "paused"}, "ended"),
}


def _err(loc: list[Any], msg: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg}


async def check_definition(*, definition: CampaignDefinition, peers: Peers, now: datetime) -> None:
    """Refuse (422, naming each field) what can never run; ask segmentation and the notifier about keys.

    Raises PeerUnavailable (503) when they cannot be asked: nothing is saved unchecked.
    """
    errors: list[dict[str, Any]] = []
    t = definition.trigger
    if isinstance(t, Schedule):
        last_local = datetime.combine(t.until or t.date, t.local_time, tzinfo=UTC) + LATEST_OFFSET
        if t.every_days is None and last_local <= now:
            errors.append(_err(["trigger", "date"], f"the schedule {t.date} {t.local_time} is in the past everywhere"))
        elif t.until is not None and last_local <= now:
            errors.append(_err(["trigger", "until"], f"the schedule ended on {t.until}: it is in the past"))
    lim = definition.limits
    if lim.ends_at is not None and lim.ends_at <= now:
        errors.append(_err(["limits", "ends_at"], "ends_at is in the past: the campaign could never run"))
    aud = definition.audience
    if definition.offer.is_discount and aud.tiers and set(aud.tiers) <= set(definition.economics.guard_tiers):
        errors.append(
            _err(
                ["audience", "tiers"], "every targeted tier is skipped by economics.guard_tiers: nobody can be reached"
            )
        )
    keys: list[tuple[list[Any], str]] = []
    if isinstance(t, SegmentEntered):
        keys.append((["trigger", "segment_key"], t.segment_key))
    keys += [(["audience", "include_segments", i], k) for i, k in enumerate(aud.include_segments)]
    keys += [(["audience", "exclude_segments", i], k) for i, k in enumerate(aud.exclude_segments)]
    known: dict[str, bool] = {}
    for loc, key in keys:
        if key not in known:
            known[key] = await peers.segment_exists(key)
        if not known[key]:
            errors.append(_err(loc, f"unknown segment key {key!r}"))
    template = definition.delivery.template
    channels = await peers.template_channels(template)
    forced = definition.delivery.channel
    if not channels:
        errors.append(
            _err(["delivery", "template"], f"unknown template {template!r}: the notifier has none by that key")
        )
    elif forced and forced not in channels:
        errors.append(
            _err(
                ["delivery", "template"],
                f"template {template!r} has no {forced} version (it has {', '.join(sorted(channels))}): "
                "no template for any allowed channel",
            )
        )
    if errors:
        raise InvalidCampaign(errors)


def _revalidated(merged: dict[str, Any]) -> CampaignDefinition:
    try:
        return CampaignDefinition.model_validate(merged)
    except ValidationError as exc:
        raise InvalidCampaign(
            [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)]
        ) from None


def _row(definition: CampaignDefinition) -> dict[str, Any]:
    lim = definition.limits
    return {
        "name": definition.name,
        "definition": definition.model_dump(mode="json"),
        "trigger_kind": definition.trigger.kind,
        "priority": lim.priority,
        "starts_at": lim.starts_at,
        "ends_at": lim.ends_at,
    }


async def _load(repo: OffersRepository, campaign_id: str, *, for_update: bool = False) -> dict[str, Any]:
    row = await repo.get_campaign(campaign_id, for_update=for_update)
    if row is None:
        raise CampaignNotFound(f"no campaign {campaign_id!r}")
    return row


async def get_campaign(*, session: AsyncSession, campaign_id: str) -> dict[str, Any]:
    return await _load(OffersRepository(session), campaign_id)


async def create_campaign(
    *, session: AsyncSession, peers: Peers, definition: CampaignDefinition, now: datetime
) -> dict[str, Any]:
    """Check and save a new draft campaign (version 1)."""
    await check_definition(definition=definition, peers=peers, now=now)
    repo = OffersRepository(session)
    campaign_id = f"cmp_{uuid.uuid4().hex[:16]}"
    await repo.insert_campaign({"id": campaign_id, "state": "draft", "version": 1, "now": now, **_row(definition)})
    return await _load(repo, campaign_id)


async def update_campaign(
    *, session: AsyncSession, peers: Peers, campaign_id: str, changes: CampaignUpdate, now: datetime
) -> dict[str, Any]:
    """Replace the given sections; a draft is edited in place, an active or paused campaign gets a new version."""
    repo = OffersRepository(session)
    row = await _load(repo, campaign_id, for_update=True)
    if row["state"] == "ended":
        raise InvalidTransition(f"campaign {campaign_id!r} has ended and cannot be edited")
    patch = changes.model_dump(mode="json", exclude_unset=True)
    merged = {**row["definition"], **patch}
    definition = _revalidated(merged)
    if definition.model_dump(mode="json") == row["definition"]:
        return row
    await check_definition(definition=definition, peers=peers, now=now)
    version = row["version"] if row["state"] == "draft" else row["version"] + 1
    await repo.update_campaign(campaign_id, {**_row(definition), "version": version, "updated_at": now})
    await repo.insert_version(campaign_id, version, definition.model_dump(mode="json"), now)
    return await _load(repo, campaign_id)


async def transition(
    *, session: AsyncSession, peers: Peers, campaign_id: str, action: str, now: datetime
) -> dict[str, Any]:
    """Move a campaign along draft -> active <-> paused -> ended; (re)activation checks the definition again."""
    repo = OffersRepository(session)
    row = await _load(repo, campaign_id, for_update=True)
    allowed, target = TRANSITIONS[action]
    if row["state"] not in allowed:
        raise InvalidTransition(
            f"cannot {action} a campaign that is {row['state']}",
            details={"state": row["state"], "allowed_from": sorted(allowed)},
        )
    changes: dict[str, Any] = {"state": target, "updated_at": now}
    if target == "active":
        await check_definition(definition=CampaignDefinition.model_validate(row["definition"]), peers=peers, now=now)
        if row["activated_at"] is None:
            changes["activated_at"] = now
    if target == "ended":
        changes["ended_at"] = now
    await repo.update_campaign(campaign_id, changes)
    return await _load(repo, campaign_id)


async def dry_run(
    *,
    session: AsyncSession,
    definition: CampaignDefinition,
    campaign_id: str | None,
    version: int,
    now: datetime,
    settings: Settings,
) -> dict[str, Any]:
    """How many the definition would reach now, by outcome, and what it would cost (nothing is written)."""
    active = Active(id=campaign_id or f"dry-run:{uuid.uuid4().hex[:12]}", version=version, definition=definition)
    t = definition.trigger
    spec = time_candidates(active)
    if spec is not None:
        cand_sql, params = spec
    elif isinstance(t, SegmentEntered):
        cand_sql, params = SEGMENT_MEMBERS_CANDS, {"cid": active.id, "segment_key": t.segment_key}
    else:
        cand_sql, params = ALL_CUSTOMERS_CANDS, {"cid": active.id}
    rows = await OffersRepository(session).dry_run(
        cand_sql=cand_sql,
        params={
            **base_params([active], settings, now),
            **params,
            "batch": 10**9,
            "sms_cost": str(settings.sms_cost_per_message),
            "email_cost": str(settings.email_cost_per_message),
            "push_cost": str(settings.push_cost_per_message),
        },
    )
    outcomes = {o: 0 for o in OUTCOMES if o != "waiting"}
    discount = Decimal(0)
    channel = Decimal(0)
    for r in rows:
        outcomes[r["outcome"]] = int(r["n"])
        discount += Decimal(r["discount_cost"])
        channel += Decimal(r["channel_cost"])
    rate = definition.economics.expected_redemption_rate
    if rate is None:
        rate = settings.expected_redemption_rate
    expected = (discount * Decimal(str(rate)) + channel).quantize(Decimal("0.01"))
    return {
        "evaluated": sum(outcomes.values()),
        "reached": outcomes["requested"],
        "outcomes": outcomes,
        "discount_cost": discount.quantize(Decimal("0.01")),
        "channel_cost": channel.quantize(Decimal("0.01")),
        "expected_cost": expected,
        "expected_redemption_rate": rate,
    }
