"""The dispatcher: claims due messages (SKIP LOCKED), sends them concurrently, records outcomes.

Network I/O never happens inside a consumer transaction: the consumer records the message and
its decision, and this loop does the sending in three steps per batch: claim (short transaction,
rows leased as `sending`), send (no transaction open; a bounded number in flight), record (one
transaction: states, attempts, delivery events in the outbox). A process that dies mid-batch
leaves `sending` rows whose lease runs out; the next pass takes them again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm_common.clock import Clock
from notifier import metrics
from notifier.deliveries import delivery_event, emit
from notifier.errors import RenderFailed
from notifier.messages import STATE_OF
from notifier.models import Contact, Message, Template
from notifier.policy import Policy, decide
from notifier.providers import Outbound, Providers, SendResult
from notifier.rendering import Renderer
from notifier.repository import NotifierRepository
from notifier.tracking import Links

log = logging.getLogger(__name__)


@dataclass
class DispatchStats:
    passes: int = 0
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    parked: int = 0
    deferred: int = 0
    suppressed: int = 0
    expired: int = 0


@dataclass(slots=True)
class _Plan:
    message: Message
    outbound: Outbound | None = None
    result: SendResult | None = None
    update: dict[str, Any] = field(default_factory=dict)


def pick_template(candidates: list[Template], locales: list[str]) -> Template | None:
    """The template for the first locale that has one (exact, then language only), else any."""
    by_locale = {t.locale.lower(): t for t in candidates}
    for loc in locales:
        loc = loc.lower().replace("_", "-")
        if loc in by_locale:
            return by_locale[loc]
        lang = loc.split("-")[0]
        if lang in by_locale:
            return by_locale[lang]
    return candidates[0] if candidates else None


class Dispatcher:
    """Send due messages through the providers, a bounded number at a time.

    It has no loop of its own: the service registers `run_once` as runtime workers
    (`dispatch_workers` of them), woken after commits that record messages, with the settings'
    poll interval as the fallback for deferred and retried messages.
    """

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Any,
        clock: Clock,
        providers: Providers,
        renderer: Renderer,
        links: Links,
        policy: Policy,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.clock = clock
        self.providers = providers
        self.renderer = renderer
        self.links = links
        self.policy = policy
        self.on_recorded = on_recorded
        self.stats = DispatchStats()
        self._sem = asyncio.Semaphore(settings.dispatch_concurrency)
        # The runtime workers that run `run_once` (see notifier.app); `wake` wakes them all.
        self.wakers: list[Callable[[], None]] = []

    # -- wake-ups -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due messages now (called after a commit that recorded some)."""
        for wake in self.wakers:
            wake()

    # -- one pass --------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim, send and record one batch; return how many messages were claimed."""
        s = self.settings
        now = self.clock.now()
        async with self.sessionmaker() as session:
            repo = NotifierRepository(session)
            messages = await repo.claim_due(
                now=now,
                lease_until=now + timedelta(seconds=s.dispatch_lease_s),
                limit=s.dispatch_batch_size,
            )
            if not messages:
                await session.rollback()
                return 0
            contacts = await repo.contacts_by_id([m.customer_id for m in messages])
            templates = await repo.templates_for_keys([m.template for m in messages])
            await session.commit()
        self.stats.passes += 1
        self.stats.claimed += len(messages)
        by_key: dict[str, dict[str, list[Template]]] = defaultdict(lambda: defaultdict(list))
        for t in templates:
            by_key[t.key][t.channel].append(t)
        plans = await self.renderer.offload(
            lambda: [self._plan(m, contacts.get(m.customer_id), by_key.get(m.template, {}), now) for m in messages]
        )
        sending = iter([p for p in plans if p.outbound is not None])
        senders = min(len(messages), s.dispatch_concurrency)
        await asyncio.gather(*(self._send_each(sending) for _ in range(senders)))
        await self._record(plans)
        return len(messages)

    def _plan(
        self,
        m: Message,
        contact: Contact | None,
        templates: dict[str, list[Template]],
        now: datetime,
    ) -> _Plan:
        plan = _Plan(m)
        decision = decide(msg=m, contact=contact, now=now, template_channels=set(templates), policy=self.policy)
        if decision.action != "send":
            plan.update = {
                "state": STATE_OF[decision.action],
                "reason": decision.reason,
                "channel": decision.channel,
                "next_attempt_at": decision.until,
            }
            return plan
        assert contact is not None and decision.channel is not None
        channel = decision.channel
        template = pick_template(
            templates[channel],
            [x for x in (m.locale, contact.locale, self.settings.default_locale) if x],
        )
        assert template is not None
        # Signing costs per message: only for e-mail (header) or templates showing the link.
        needs_link = channel == "email" or "unsubscribe_url" in f"{template.subject}{template.body}"
        unsubscribe_url = self.links.unsubscribe_url(m.id, m.customer_id, channel) if needs_link else ""
        implicit = {
            "customer": {
                "customer_id": m.customer_id,
                "first_name": contact.first_name,
                "last_name": contact.last_name,
                "locale": contact.locale,
            },
            "message_id": m.id,
            "unsubscribe_url": unsubscribe_url,
        }
        try:
            rendered = self.renderer.render(
                template, m.variables or {}, implicit, budget_ms=self.settings.render_timeout_ms
            )
        except RenderFailed as exc:
            plan.update = {
                "state": "failed",
                "reason": exc.reason,
                "channel": channel,
            }
            return plan
        html = self.links.instrument_html(rendered.html, m.id) if rendered.html else None
        to = {"email": contact.email, "sms": contact.phone}.get(channel) or (contact.push_tokens or [""])[-1]
        plan.outbound = Outbound(
            message_id=m.id,
            customer_id=m.customer_id,
            channel=channel,
            to=to or "",
            subject=rendered.subject,
            body=rendered.body,
            html=html,
            unsubscribe_url=unsubscribe_url if channel == "email" else None,
        )
        return plan

    async def _send_each(self, plans: Iterator[_Plan]) -> None:
        """Send plans one after another; a few of these share a batch (not one task per message)."""
        for plan in plans:
            await self._send(plan)

    async def _send(self, plan: _Plan) -> None:
        assert plan.outbound is not None
        provider = self.providers.get(plan.outbound.channel)
        async with self._sem:
            try:
                plan.result = await provider.send(plan.outbound)
            except Exception as exc:  # a bug in a provider must not lose the message: park it
                log.exception("provider %s raised", provider.name)
                plan.result = SendResult("transient", error=f"{type(exc).__name__}: {exc}"[:1000], tries=1)

    def _park_delay(self, attempts: int) -> timedelta:
        s = self.settings
        ceiling = min(s.park_max_s, s.park_base_s * 2 ** min(attempts, 20))
        return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))

    async def _record(self, plans: list[_Plan]) -> None:
        now = self.clock.now()
        s = self.settings
        updates: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        events = []
        stale_tokens: list[tuple[str, str]] = []
        for p in plans:
            m = p.message
            if p.outbound is not None and p.result is not None:
                r = p.result
                channel = p.outbound.channel
                up: dict[str, Any] = {"channel": channel, "provider": channel, "inc": 1}
                if r.outcome == "ok":
                    up |= {
                        "state": "sent",
                        "provider_message_id": r.provider_message_id,
                        "cost": r.cost,
                        "sent_at": now,
                    }
                elif r.outcome == "permanent":
                    up |= {"state": "failed", "reason": f"provider_rejected: {r.error}"[:1000]}
                    if channel == "push" and r.status_code == 404:
                        # FCM answers 404 (UNREGISTERED) for a token that no longer exists.
                        stale_tokens.append((m.customer_id, p.outbound.to))
                elif m.attempts + 1 >= s.max_attempts:
                    up |= {"state": "failed", "reason": f"retries_exhausted: {r.error}"[:1000]}
                elif r.outcome == "unavailable":
                    # Not tried: the breaker is open. Look again when it lets a probe through.
                    delay = timedelta(seconds=s.breaker_cooldown_s * random.uniform(1.0, 1.5))
                    up |= {
                        "state": "queued",
                        "reason": r.error,
                        "next_attempt_at": now + delay,
                        "inc": 0,
                    }
                else:
                    up |= {
                        "state": "retrying",
                        "reason": r.error,
                        "next_attempt_at": now + self._park_delay(m.attempts),
                    }
                if r.outcome != "unavailable":
                    attempts.append(
                        {
                            "message_id": m.id,
                            "provider": channel,
                            "outcome": r.outcome,
                            "status_code": r.status_code,
                            "error": r.error,
                            "tries": r.tries,
                            "duration_ms": r.duration_ms,
                            "at": now,
                        }
                    )
                p.update = up
            up = p.update
            up["id"] = m.id
            updates.append(up)
            state = up["state"]
            m.channel = up.get("channel") or m.channel
            if state in ("sent", "failed", "suppressed", "expired"):
                events.append(
                    delivery_event(
                        message=m,
                        status=state,
                        at=now,
                        reason=up.get("reason"),
                        cost=up.get("cost"),
                    )
                )
            self._count(state)
        async with self.sessionmaker() as session:
            repo = NotifierRepository(session)
            await repo.settle(updates, now)
            await repo.add_attempts(attempts)
            await repo.drop_push_tokens(stale_tokens)
            await emit(session, events)
            await session.commit()
        if self.on_recorded is not None:
            self.on_recorded()
        self._observe(plans)

    def _observe(self, plans: list[_Plan]) -> None:
        """Count what was recorded (after the commit, so the figures match the database).

        Counters are added up per label set first: one increment per label set and batch.
        """
        states: Counter[tuple[str, str]] = Counter()
        calls: Counter[tuple[str, str]] = Counter()
        costs: defaultdict[str, float] = defaultdict(float)
        for p in plans:
            states[(p.update.get("channel") or p.message.channel or "-", p.update["state"])] += 1
            r = p.result
            if r is None or p.outbound is None:
                continue
            provider = p.outbound.channel
            calls[(provider, r.outcome)] += 1
            if r.outcome != "unavailable":
                metrics.PROVIDER_SECONDS.labels(provider).observe(r.duration_ms / 1000)
            if r.cost is not None and r.outcome == "ok":
                costs[provider] += float(r.cost)
        for (channel, state), n in states.items():
            metrics.MESSAGES.labels(channel, state).inc(n)
        for (provider, outcome), n in calls.items():
            metrics.PROVIDER_CALLS.labels(provider, outcome).inc(n)
        for provider, cost in costs.items():
            metrics.SMS_COST.labels(provider).inc(cost)

    def _count(self, state: str) -> None:
        st = self.stats
        if state == "sent":
            st.sent += 1
        elif state == "failed":
            st.failed += 1
        elif state in ("queued", "retrying"):
            st.parked += 1
        elif state == "deferred":
            st.deferred += 1
        elif state == "suppressed":
            st.suppressed += 1
        elif state == "expired":
            st.expired += 1
