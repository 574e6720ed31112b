"""The decision log read back: one plain sentence per outcome, and "why did or didn't they get it"."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from offers.repository import OffersRepository

_REASONS = {
    "quiet_hours": "quiet hours in their time zone",
    "frequency_cap": "the frequency cap on marketing messages",
    "unknown_contact": "no contact data for them",
    "expired": "the offer expired before it could go out",
}


def _delivery_reason(reason: str | None) -> str:
    if not reason:
        return "no reason given"
    kind, _, channel = reason.partition(":")
    if kind == "no_consent":
        return f"no consent for {channel or 'the channel'}"
    if kind == "no_address":
        return f"no {channel or 'channel'} address"
    if kind == "no_template":
        return f"no template for {channel or 'any channel'}"
    return _REASONS.get(reason, reason.replace("_", " "))


def explain(d: dict[str, Any], campaign_name: str | None = None) -> str:
    """One sentence on one decision."""
    who = d["customer_id"]
    what = f"campaign {campaign_name!r}" if campaign_name else f"campaign {d['campaign_id']}"
    when = d["at"].strftime("%Y-%m-%d %H:%M UTC")
    outcome = d["outcome"]
    if outcome == "requested":
        status = d.get("delivery_status")
        channel = d.get("delivery_channel")
        via = f" by {channel}" if channel else ""
        if status in ("sent", "delivered", "opened", "clicked"):
            tail = f" and the notifier reports it {status}{via}"
        elif status == "suppressed":
            tail = f", but the notifier suppressed it: {_delivery_reason(d.get('delivery_reason'))}"
        elif status in ("failed", "expired"):
            tail = f", but delivery {status}: {_delivery_reason(d.get('delivery_reason'))}"
        else:
            tail = "; the notifier has not reported on it yet"
        return f"{who} was sent {what} (version {d['version']}) on {when}{tail}."
    sentences = {
        "control": "is in the campaign's control group, held out so the campaign can be measured: nothing was sent",
        "global_control": "is in the platform-wide global control group, which no marketing campaign touches",
        "not_in_audience": "was not in the campaign's audience (segments, value tiers or profile conditions)",
        "economics_guard": "was skipped by the economics guard: their expected margin does not cover the discount",
        "cooldown": "was skipped because the campaign had reached them within its cooldown",
        "once_per_customer": "was skipped because the campaign reaches each customer once and already had",
        "lower_priority": "was skipped because a campaign of higher priority reached them within the collision window",
        "budget_exhausted": "was skipped because the campaign's budget was exhausted",
        "outside_window": "was skipped because the window before their predicted next purchase had already passed",
        "already_bought": "was not messaged because they bought (within the wait, or in this purchase cycle)",
        "waiting": "is waiting: a purchase before the wait ends cancels the reminder",
    }
    return f"{who} {sentences.get(outcome, outcome)} ({what}, {when})."


async def customer_decisions(
    *, session: AsyncSession, customer_id: str, campaign_id: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = await OffersRepository(session).customer_decisions(customer_id, campaign_id=campaign_id, limit=limit)
    return [{**r, "explanation": explain(r)} for r in rows]


async def why(*, session: AsyncSession, campaign: dict[str, Any], customer_id: str) -> dict[str, Any]:
    """Why this customer did or did not get this campaign: every decision, and one sentence on the latest."""
    rows = await OffersRepository(session).customer_decisions(customer_id, campaign_id=campaign["id"], limit=100)
    decisions = [{**r, "explanation": explain(r, campaign["name"])} for r in rows]
    if not decisions:
        sentence = (
            f"{customer_id} has not been evaluated for campaign {campaign['name']!r}: "
            f"its trigger ({campaign['trigger_kind']}) has not fired for them"
            + (" while it was active." if campaign["state"] != "draft" else "; the campaign is still a draft.")
        )
        return {
            "campaign_id": campaign["id"],
            "customer_id": customer_id,
            "received": False,
            "outcome": None,
            "sentence": sentence,
            "decisions": [],
        }
    sent = [d for d in decisions if d["outcome"] == "requested"]
    latest = sent[0] if sent else decisions[0]
    return {
        "campaign_id": campaign["id"],
        "customer_id": customer_id,
        "received": bool(sent) and sent[0].get("delivery_status") not in ("suppressed", "failed", "expired"),
        "outcome": latest["outcome"],
        "sentence": latest["explanation"],
        "decisions": decisions,
    }
