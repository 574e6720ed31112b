"""Accept message requests: record each once with its decision; the dispatcher does the I/O."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import MessageRequested
from notifier.deliveries import delivery_event, emit
from notifier.policy import Decision, Policy, decide
from notifier.repository import NotifierRepository

STATE_OF = {
    "send": "pending",
    "defer": "deferred",
    "suppress": "suppressed",
    "expire": "expired",
    "fail": "failed",
}
FINAL_STATUS = {"suppressed", "expired", "failed"}


@dataclass(slots=True)
class MessageView:
    """The fields of a message the policy reads, before it has a row."""

    id: str
    customer_id: str
    kind: str
    requested_channel: str | None
    channel: str | None
    not_before: datetime | None
    expires_at: datetime | None
    created_at: datetime
    campaign_id: str | None
    offer_id: str | None


def template_channels(templates: list[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for t in templates:
        out[t.key].add(t.channel)
    return out


async def accept_requests(
    *, session: AsyncSession, requests: list[MessageRequested], now: datetime, policy: Policy
) -> list[str]:
    """Record new requests (ids seen before change nothing); return the ids that are due now."""
    repo = NotifierRepository(session)
    requests = list({r.id: r for r in requests}.values())
    existing = await repo.existing_message_ids([r.id for r in requests])
    requests = [r for r in requests if r.id not in existing]
    if not requests:
        return []
    customer_ids = [r.customer_id for r in requests]
    # Two writers for one customer (ops send, a consumer during a rebalance) must not both pass the cap.
    await repo.lock_customers([r.customer_id for r in requests if r.kind == "marketing"])
    contacts = await repo.contacts_by_id(customer_ids)
    channels = template_channels(await repo.templates_for_keys([r.template for r in requests]))
    counts = defaultdict(int, await repo.marketing_counts(customer_ids, now - policy.cap_window))
    rows: list[dict[str, Any]] = []
    finals: list[tuple[MessageView, Decision]] = []
    due: list[str] = []
    for req in requests:
        view = MessageView(
            id=req.id,
            customer_id=req.customer_id,
            kind=req.kind,
            requested_channel=req.channel,
            channel=req.channel,
            not_before=req.not_before,
            expires_at=req.expires_at,
            created_at=now,
            campaign_id=req.campaign_id,
            offer_id=req.offer_id,
        )
        decision = decide(
            msg=view,
            contact=contacts.get(req.customer_id),
            now=now,
            template_channels=channels.get(req.template, set()),
            policy=policy,
        )
        if req.kind == "marketing" and decision.action in ("send", "defer"):
            # The cap is reserved at acceptance: a deferred marketing message already counts.
            if counts[req.customer_id] >= policy.marketing_cap:
                decision = Decision("suppress", decision.channel, "frequency_cap")
            else:
                counts[req.customer_id] += 1
        state = STATE_OF[decision.action]
        view.channel = decision.channel
        rows.append(
            {
                "id": req.id,
                "customer_id": req.customer_id,
                "kind": req.kind,
                "template": req.template,
                "requested_channel": req.channel,
                "channel": decision.channel,
                "locale": req.locale,
                "variables": req.variables,
                "campaign_id": req.campaign_id,
                "offer_id": req.offer_id,
                "source_service": req.source_service[:64],
                "state": state,
                "reason": decision.reason,
                "not_before": req.not_before,
                "expires_at": req.expires_at,
                "next_attempt_at": now if state == "pending" else decision.until,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
        if state in FINAL_STATUS:
            finals.append((view, decision))
        elif state == "pending":
            due.append(req.id)
    inserted = await repo.insert_messages(rows)
    await emit(
        session,
        [
            delivery_event(message=v, status=STATE_OF[d.action], at=now, reason=d.reason)
            for v, d in finals
            if v.id in inserted
        ],
    )
    return [i for i in due if i in inserted]
