"""The dispatch decision: channel by consent, preference and cost; quiet hours; expiry; cap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

# Cheapest first: push is free, e-mail nearly so, SMS is paid.
CHANNELS_BY_COST = ("push", "email", "sms")

Action = Literal["send", "defer", "suppress", "expire", "fail"]


@dataclass(frozen=True, slots=True)
class Policy:
    default_timezone: str = "UTC"
    quiet_start: time = time(21, 0)
    quiet_end: time = time(9, 0)
    quiet_for_transactional: bool = False
    contact_wait: timedelta = timedelta(minutes=10)
    contact_recheck: timedelta = timedelta(seconds=30)
    marketing_cap: int = 3
    cap_window: timedelta = timedelta(days=7)

    @classmethod
    def from_settings(cls, s: Any) -> Policy:
        return cls(
            default_timezone=s.default_timezone,
            quiet_start=time.fromisoformat(s.quiet_hours_start),
            quiet_end=time.fromisoformat(s.quiet_hours_end),
            quiet_for_transactional=s.quiet_hours_for_transactional,
            contact_wait=timedelta(seconds=s.contact_wait_s),
            contact_recheck=timedelta(seconds=s.contact_recheck_s),
            marketing_cap=s.marketing_cap,
            cap_window=timedelta(days=s.marketing_cap_days),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    channel: str | None = None
    reason: str | None = None
    until: datetime | None = None


def reachable(contact: Any, channel: str) -> bool:
    """True when the contact has an address on the channel."""
    if channel == "email":
        return bool(contact.email)
    if channel == "sms":
        return bool(contact.phone)
    return bool(contact.push_tokens)


def consented(contact: Any, channel: str) -> bool:
    """Marketing needs an explicit yes on the channel; unknown means no."""
    return getattr(contact, f"consent_{channel}", None) is True


def usable(contact: Any, channel: str, kind: str) -> bool:
    # Transactional messages (receipts, expiry notices) need an address, not marketing consent.
    return reachable(contact, channel) and (kind == "transactional" or consented(contact, channel))


def choose_channel(*, contact: Any, kind: str, requested: str | None, template_channels: set[str]) -> Decision:
    """Pick the channel: the requested one, else the preference, else the cheapest usable one."""
    if requested:
        if requested not in template_channels:
            return Decision("fail", requested, f"no_template:{requested}")
        if not reachable(contact, requested):
            return Decision("suppress", requested, f"no_address:{requested}")
        if kind == "marketing" and not consented(contact, requested):
            return Decision("suppress", requested, f"no_consent:{requested}")
        return Decision("send", requested)
    if not template_channels:
        return Decision("fail", None, "no_template")
    order = [contact.preferred_channel] if contact.preferred_channel in CHANNELS_BY_COST else []
    order += [c for c in CHANNELS_BY_COST if c not in order]
    for channel in order:
        if channel in template_channels and usable(contact, channel, kind):
            return Decision("send", channel)
    return Decision("suppress", None, "no_consented_channel" if kind == "marketing" else "no_reachable_channel")


def zone(name: str | None, default: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or default)
    except Exception:
        return ZoneInfo(default)


def quiet_until(*, now: datetime, tz: ZoneInfo, start: time, end: time) -> datetime | None:
    """The end of the quiet period `now` falls in (local wall time), or None outside it."""
    local = now.astimezone(tz)
    t = local.time().replace(tzinfo=None)
    if start == end:
        return None
    if start > end:  # wraps midnight, e.g. 21:00-09:00
        if t >= start:
            day = local.date() + timedelta(days=1)
        elif t < end:
            day = local.date()
        else:
            return None
    else:
        if not (start <= t < end):
            return None
        day = local.date()
    return datetime.combine(day, end, tzinfo=tz).astimezone(UTC)


def decide(*, msg: Any, contact: Any, now: datetime, template_channels: set[str], policy: Policy) -> Decision:
    """What to do with a message now: send on a channel, defer, suppress, expire or fail."""
    if msg.expires_at is not None and msg.expires_at <= now:
        return Decision("expire", msg.channel, "expired")
    if contact is None:
        if now < msg.created_at + policy.contact_wait:
            return Decision("defer", None, "awaiting_contact", now + policy.contact_recheck)
        return Decision("suppress", None, "unknown_contact")
    chosen = choose_channel(
        contact=contact,
        kind=msg.kind,
        requested=msg.requested_channel,
        template_channels=template_channels,
    )
    if chosen.action != "send":
        return chosen
    if msg.not_before is not None and msg.not_before > now:
        return Decision("defer", chosen.channel, "not_before", msg.not_before)
    if msg.kind == "marketing" or policy.quiet_for_transactional:
        until = quiet_until(
            now=now,
            tz=zone(contact.timezone, policy.default_timezone),
            start=policy.quiet_start,
            end=policy.quiet_end,
        )
        if until is not None:
            if msg.expires_at is not None and msg.expires_at <= until:
                return Decision("expire", chosen.channel, "expires_during_quiet_hours")
            return Decision("defer", chosen.channel, "quiet_hours", until)
    return chosen
