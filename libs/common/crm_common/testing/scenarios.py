"""The reference scenarios driven end to end through all five services, on one simulated clock.

`platform(...)` starts ingest, segmentation, loyalty, offers and the notifier in this process (the
same `create_app` each service deploys, each on its own database, all on one broker), sharing one
`ManualClock`; segmentation and the notifier are served over real HTTP (uvicorn) because offers asks
them over HTTP; e-mail goes to an SMTP server, SMS and push to loopback HTTP providers.
`World(platform, history).run()` then plays the scenarios in steps of simulated time, only through
the public HTTP APIs (events through ingest, campaigns and segments through the ops APIs, sweeps
through `/v1/ops/sweeps/{name}`), and keeps what each step answered. The end-to-end tests
(`tests/test_scenarios.py`) assert on it; `make demo` prints it.

Service packages are imported inside `platform()`: crm_common does not depend on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from crm_common.clock import ManualClock
from crm_common.devstack import pipeline_pending
from crm_common.sinks import LoopbackProvider
from crm_common.testing.generator import History, PlantedUplift, plant_uplift, purchase_event, sign_up
from crm_common.testing.helpers import OFFER_VARIABLES, TEST_AUTH, Mailbox, serve_app, smtp_mailbox

POS_KEY = "scenario-pos-key"
SMS_COST = Decimal("0.05")


@dataclass
class Platform:
    ingest: httpx.AsyncClient
    seg: httpx.AsyncClient
    loyalty: httpx.AsyncClient
    offers: httpx.AsyncClient
    notifier: httpx.AsyncClient
    clock: ManualClock
    mailbox: Mailbox
    sms: LoopbackProvider
    push: LoopbackProvider
    site_key: str = ""
    # The five apps, and the base URLs of the services served over HTTP (segmentation and notifier; all five
    # with `platform(over_http=True)`).
    apps: dict[str, Any] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def services(self) -> dict[str, httpx.AsyncClient]:
        return {
            "ingest": self.ingest,
            "segmentation": self.seg,
            "loyalty": self.loyalty,
            "offers": self.offers,
            "notifier": self.notifier,
        }

    async def post_events(self, events: list[dict[str, Any]], batch: int = 500) -> int:
        """Post through ingest in batches; anonymous site events with a `site` key. Answers accepted."""
        accepted = 0
        for i in range(0, len(events), batch):
            chunk = events[i : i + batch]
            for anon in (False, True):
                part = [e for e in chunk if ("customer_id" not in e) == anon]
                if not part:
                    continue
                key = self.site_key if anon else POS_KEY
                r = await self.ingest.post(
                    "/v1/events", json={"events": part}, headers={"Authorization": f"Bearer {key}"}
                )
                body = r.json()
                if r.status_code != 202 or body["rejected"]:
                    raise AssertionError(f"ingest answered {r.status_code}: {r.text[:1000]}")
                accepted += body["accepted"]
        return accepted

    async def drain(self, stall_timeout: float = 90, say: Callable[[str], None] | None = None) -> None:
        """Wait until every consumer's lag and every outbox is empty, twice in a row. Gives up only when the
        work left has not shrunk for `stall_timeout` s, so a large history drains however long it takes;
        `say` hears how much is left every 10 s."""
        quiet = 0
        best: int | None = None
        progress_at = last_said = time.monotonic()
        pending: list[str] = []
        while True:
            pending, left = [], 0
            for name, client in self.services().items():
                doc = (await client.get("/v1/ops/pipeline")).json()
                pending += pipeline_pending(name, doc)
                left += max(doc.get("outbox_backlog") or 0, 0)
                left += sum(c["lag"] for c in doc.get("consumers", []) if isinstance(c.get("lag"), int))
            quiet = quiet + 1 if not pending else 0
            if quiet >= 2:
                return
            now = time.monotonic()
            if best is None or left < best:
                best, progress_at = left, now
            if now - progress_at > stall_timeout:
                raise AssertionError(f"pipeline not drained: no progress for {stall_timeout:.0f} s: {pending}")
            if say is not None and left and now - last_said >= 10:
                say(f"draining: {left:,} messages and outbox rows left")
                last_said = now
            await asyncio.sleep(0.2)

    async def sweep(self, service: str, name: str) -> dict[str, Any]:
        r = await self.services()[service].post(f"/v1/ops/sweeps/{name}")
        if r.status_code != 200:
            raise AssertionError(f"sweep {service}/{name}: {r.status_code} {r.text[:500]}")
        return r.json()["result"]  # type: ignore[no-any-return]

    async def get(self, service: str, path: str, **params: Any) -> Any:
        r = await self.services()[service].get(path, params=params or None)
        if r.status_code != 200:
            raise AssertionError(f"GET {service}{path}: {r.status_code} {r.text[:500]}")
        return r.json()


@asynccontextmanager
async def platform(
    make_database: Callable[[str], Awaitable[str]],
    bootstrap: str,
    topic_prefix: str,
    clock: ManualClock,
    *,
    over_http: bool = False,
    api_keys: str | None = None,
    **notifier_kw: Any,
) -> AsyncIterator[Platform]:
    """All five services in this process on one clock; `make_database(package)` answers a migrated
    database URL (the pytest plugin's fixture, or the demo's). `over_http` serves every service
    on a loopback port (the console's tests reach them through its proxy), not only the two that
    offers calls; `api_keys` replaces CRM_API_KEYS (scoped keys) for the four ops APIs."""
    from crm_common.testing.helpers import run_app
    from ingest.app import create_app as ingest_app
    from ingest.keys import ensure_bootstrap_key
    from ingest.settings import Settings as IngestSettings
    from loyalty.app import create_app as loyalty_app
    from loyalty.settings import Settings as LoyaltySettings
    from notifier.app import create_app as notifier_app
    from notifier.settings import Settings as NotifierSettings
    from offers.app import create_app as offers_app
    from offers.settings import Settings as OffersSettings
    from segmentation.app import create_app as segmentation_app
    from segmentation.settings import Settings as SegmentationSettings

    def settings(cls: type, url: str, **kw: Any) -> Any:
        return cls(
            database_url=url,
            kafka_bootstrap_servers=bootstrap,
            topic_prefix=topic_prefix,
            consumers_enabled=True,
            sweeps_enabled=False,  # the scenarios run every sweep themselves, at simulated times
            log_json=False,
            kafka_consumer_batch_timeout_ms=50,
            **({"api_keys": api_keys} if api_keys is not None else {}),
            **kw,
        )

    urls: dict[str, str] = {}
    apps: dict[str, Any] = {}

    async def client(name: str, app: Any, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        apps[name] = app
        if not over_http:
            return await stack.enter_async_context(run_app(app, headers=headers))
        urls[name] = await stack.enter_async_context(serve_app(app))
        auth = TEST_AUTH if headers is None else headers
        return await stack.enter_async_context(httpx.AsyncClient(base_url=urls[name], headers=auth, timeout=60))

    async with AsyncExitStack() as stack:
        box, smtp_port = stack.enter_context(smtp_mailbox())
        sms = LoopbackProvider().start()
        stack.callback(sms.stop)
        push = LoopbackProvider().start()
        stack.callback(push.stop)
        ingest_url = await make_database("ingest")
        await ensure_bootstrap_key(ingest_url, POS_KEY)
        seg_app = segmentation_app(settings(SegmentationSettings, await make_database("segmentation")), clock=clock)
        note_app = notifier_app(
            settings(
                NotifierSettings,
                await make_database("notifier"),
                smtp_port=smtp_port,
                sms_url=f"{sms.url}/v1/sms",
                push_base_url=push.url,
                sms_cost_per_message=SMS_COST,
                public_base_url="http://test",
                dispatch_poll_interval_s=0.1,
                **notifier_kw,
            ),
            clock=clock,
        )
        seg_url = await stack.enter_async_context(serve_app(seg_app))
        note_url = await stack.enter_async_context(serve_app(note_app))
        urls.update(segmentation=seg_url, notifier=note_url)
        offers = await client(
            "offers",
            offers_app(
                settings(
                    OffersSettings,
                    await make_database("offers"),
                    segmentation_url=seg_url,
                    notifier_url=note_url,
                    campaign_cache_ttl_s=0.0,
                    sms_cost_per_message=SMS_COST,
                ),
                clock=clock,
            ),
        )
        loyalty = await client(
            "loyalty", loyalty_app(settings(LoyaltySettings, await make_database("loyalty")), clock=clock)
        )
        ingest = await client("ingest", ingest_app(settings(IngestSettings, ingest_url), clock=clock), headers={})
        seg = await stack.enter_async_context(httpx.AsyncClient(base_url=seg_url, headers=TEST_AUTH, timeout=60))
        note = await stack.enter_async_context(httpx.AsyncClient(base_url=note_url, headers=TEST_AUTH, timeout=60))
        p = Platform(ingest, seg, loyalty, offers, note, clock, box, sms, push, urls=urls)
        p.apps = {**apps, "segmentation": seg_app, "notifier": note_app}
        r = await ingest.post(
            "/v1/keys",
            json={"name": "site", "source": "site", "scopes": ["events:write"]},
            headers={"Authorization": f"Bearer {POS_KEY}"},
        )
        if r.status_code != 201:
            raise AssertionError(f"site key: {r.status_code} {r.text}")
        p.site_key = r.json()["key"]
        yield p


# -- the scenarios' configuration (ops APIs) ---------------------------------------------------------

TEMPLATES: list[dict[str, Any]] = [
    {
        "key": "wine_lovers",
        "channel": "email",
        "subject": "{{ discount }} off {{ product_name }}",
        "body": "Hello {{ first_name }}, we noticed you buy {{ product_name }}: {{ discount }} off your next "
        "purchase of {{ min_quantity }} bottles with code {{ coupon_code }}, valid until {{ valid_until }}.",
    },
    {
        "key": "service_recovery",
        "channel": "sms",
        "body": "{{ first_name }}, we are sorry about our last visit. Reply and we will make it right.",
    },
    {
        "key": "winback_discount",
        "channel": "sms",
        "body": "{{ first_name }}, {{ discount }} off your next 2 cleanings: "
        "code {{ coupon_code }}, valid until {{ valid_until }}.",
    },
    {
        "key": "cart_reminder",
        "channel": "email",
        "subject": "Still thinking about it?",
        "body": "{{ first_name }}, your cart is waiting: {{ products }}.",
    },
    {
        "key": "retention",
        "channel": "email",
        "subject": "New {{ category }} in your size {{ size }}",
        "body": "{{ first_name }}, new {{ color }} {{ category }} in size {{ size }} are in, with free delivery: "
        "code {{ coupon_code }}, valid until {{ valid_until }}.",
    },
    {"key": "cart_reminder", "channel": "push", "subject": "Your cart", "body": "Still there: {{ products }}"},
    {
        "key": "browse_reminder",
        "channel": "email",
        "subject": "Still looking?",
        "body": "{{ first_name }}, the {{ products }} you looked at is still here.",
    },
    {"key": "browse_reminder", "channel": "push", "subject": "Still looking?", "body": "{{ products }} is still here"},
    {"key": "new_year", "channel": "push", "subject": "New Year sale", "body": "New Year sale, {{ first_name }}!"},
    {"key": "new_year", "channel": "email", "subject": "New Year sale", "body": "New Year sale, {{ first_name }}!"},
    {"key": "new_year", "channel": "sms", "body": "New Year sale, {{ first_name }}!"},
]


def campaigns(now: datetime, control_share: float) -> dict[str, dict[str, Any]]:
    start = now.date()
    return {
        "wine": {
            "name": "Friday wine lovers",
            "trigger": {"kind": "segment_entered", "segment_key": "friday_wine_lovers"},
            "offer": {
                "kind": "percent",
                "value": "20",
                "target": "favourite_product",
                "category": "wine",
                "min_quantity": 2,
                "validity_days": 14,
                "coupon": True,
            },
            "delivery": {"template": "wine_lovers", "channel": "email"},
            "limits": {"once_per_customer": True},
            "control_share": control_share,
            "attribution_days": 7,
        },
        "recovery": {
            "name": "Service recovery",
            "audience": {
                "conditions": [
                    {"field": "last_feedback_topic", "op": "=", "value": "quality"},
                    {"field": "last_feedback_rating", "op": "<=", "value": 2},
                ]
            },
            "trigger": {"kind": "segment_entered", "segment_key": "lapsed_regulars"},
            "offer": {"kind": "info"},
            "delivery": {"template": "service_recovery"},
            "limits": {"once_per_customer": True},
            "control_share": control_share,
        },
        "winback": {
            "name": "Win back lapsed regulars",
            "audience": {"conditions": [{"field": "last_feedback_topic", "op": "!=", "value": "quality"}]},
            "trigger": {"kind": "segment_entered", "segment_key": "lapsed_regulars"},
            "offer": {
                "kind": "percent",
                "value": "15",
                "target": "basket",
                "validity_days": 60,
                "coupon": True,
                "max_uses": 2,
            },
            "delivery": {"template": "winback_discount"},
            "limits": {"once_per_customer": True},
            "control_share": control_share,
            "attribution_days": 30,
            "economics": {"guard_tiers": []},
        },
        "retention": {
            "name": "Before the next purchase",
            "trigger": {"kind": "purchase_window", "min_days": 7, "max_days": 14},
            "offer": {"kind": "free_delivery", "target": "favourite_category", "validity_days": 21, "coupon": True},
            "delivery": {"template": "retention", "channel": "email"},
            "limits": {"cooldown_days": 60},
            "control_share": control_share,
            "attribution_days": 21,
            "economics": {"guard_tiers": []},
        },
        "cart": {
            "name": "Abandoned cart",
            "trigger": {"kind": "no_purchase_after", "event_type": "cart_updated", "wait_hours": 24},
            "offer": {"kind": "info"},
            "delivery": {"template": "cart_reminder"},
            "limits": {"once_per_customer": True},
            "control_share": control_share,
        },
        "browse": {
            "name": "Browsed bags, bought nothing",
            "trigger": {
                "kind": "no_purchase_after",
                "event_type": "product_viewed",
                "properties": {"category": "bags"},
                "wait_hours": 24,
            },
            "offer": {"kind": "info"},
            "delivery": {"template": "browse_reminder"},
            "limits": {"once_per_customer": True},
            "control_share": control_share,
        },
        "broadcast": {
            "name": "New Year sale",
            "audience": {"include_segments": ["new_year_list"]},
            "trigger": {
                "kind": "schedule",
                "date": (start + timedelta(days=8)).isoformat(),
                "local_time": "10:00",
                "every_days": 1,
                "until": (start + timedelta(days=11)).isoformat(),
            },
            "offer": {"kind": "info"},
            "delivery": {"template": "new_year"},
            "control_share": control_share,
        },
    }


# Scenario 4: 1% of the paid amount, 3% from 300 of 12-month spend; points expire after 180 days,
# with a reminder 14 days before; a goal of 3 purchases in 30 days (300 points) on entering
# `visits_dropped`. Scenario 6: a referral earns the referrer 200 points and the new customer 100.
PROGRAMME = {
    "base_rate": "0.01",
    "tiers": [{"name": "top", "min_spend": "300", "rate": "0.03"}],
    "expiry_days": 180,
    "reminder_days": 14,
    "max_redeem_share": "0.30",
    "point_value": "0.01",
    "goals": {"segment_keys": ["visits_dropped"], "purchases": 3, "days": 30, "reward": "300"},
    "referral_bonus_referrer": "200",
    "referral_bonus_referred": "100",
}
GOAL_REWARD = Decimal(300)

# The planted uplift of each campaign: (campaign, amount a treated member also buys with 30 %
# probability, within how many days of the decision). The last two, planted on day 14, after the
# triggers sweeps of days 7-12 that still decide for them: the retention window (a customer first
# `lower_priority` or `outside_window` may be treated later) and the New Year sale.
UPLIFT: list[tuple[str, Decimal, float]] = [
    ("wine", Decimal("20.00"), 5),
    ("winback", Decimal("50.00"), 5),
    ("recovery", Decimal("50.00"), 5),
    ("cart", Decimal("80.00"), 4),
    ("browse", Decimal("45.00"), 4),
    ("retention", Decimal("70.00"), 1.5),
    ("broadcast", Decimal("40.00"), 1.5),
]
REFERRER_BONUS, REFERRED_BONUS = Decimal(200), Decimal(100)

# Scenario 4's "monthly visits fell below their usual": at least 12 orders in 180 days (about one a
# fortnight or more), none in the last 30.
VISITS_DROPPED_SEGMENT = {
    "key": "visits_dropped",
    "name": "Visits fell below their usual",
    "rule": {
        "all": [
            {"purchases": {"measure": "orders", "within_days": 180}, "op": ">=", "value": 12},
            {"attr": "days_since_last_purchase", "op": ">", "value": 30},
        ]
    },
}

# Scenario 5's dry-run: 10% off for every purchaser; the default guard skips the unprofitable tier.
DISCOUNT_FOR_ALL = {
    "name": "10% for everyone (dry-run)",
    "trigger": {"kind": "event", "event_type": "purchase"},
    "offer": {"kind": "percent", "value": "10", "target": "basket"},
    "delivery": {"template": "new_year"},
}

NEW_YEAR_SEGMENT = {
    "key": "new_year_list",
    "name": "New Year mailing list",
    "rule": {"purchases": {"measure": "orders", "category": "gifts", "within_days": 365}, "op": ">=", "value": 1},
}


ARMS = {"requested": "treated", "control": "control", "global_control": "control"}


@dataclass
class World:
    """The scenarios over one history; `run()` plays them and fills the fields below."""

    p: Platform
    history: History
    control_share: float = 0.1
    seed: int = 42
    log: Callable[[str], None] = lambda msg: None
    campaign_ids: dict[str, str] = field(default_factory=dict)
    t0: datetime | None = None
    expiry_reminders: int = 0
    expiry_reminders_again: int = 0
    expired: Any = None
    rfm: Any = None
    redemptions: list[dict[str, Any]] = field(default_factory=list)
    dry_run: dict[str, Any] = field(default_factory=dict)
    timers_fired: Any = None
    uplift: dict[str, PlantedUplift] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweep_results: list[Any] = field(default_factory=list)
    # Events the World posts after the history (goal customers' and referred customers' purchases,
    # the referred customers' sign-ups), and the referral codes loyalty answered.
    later_events: list[dict[str, Any]] = field(default_factory=list)
    referral_codes: dict[str, str] = field(default_factory=dict)
    # Scenario 4's refund of a purchase paid partly with points: the balances before, after the
    # purchase and after the refund, the redemption's answer, the ledger entries the refund made.
    refund_check: dict[str, Any] = field(default_factory=dict)

    async def configure(self) -> None:
        for t in TEMPLATES:
            body = {"locale": "en", "variables": OFFER_VARIABLES, "subject": None, **t}
            r = await self.p.notifier.post("/v1/templates", json=body)
            if r.status_code != 201:
                raise AssertionError(f"template {t['key']}/{t['channel']}: {r.status_code} {r.text}")
        r = await self.p.loyalty.put("/v1/programme", json=PROGRAMME)
        if r.status_code != 200:
            raise AssertionError(f"programme: {r.status_code} {r.text}")
        for segment in (NEW_YEAR_SEGMENT, VISITS_DROPPED_SEGMENT):
            r = await self.p.seg.post("/v1/segments", json=segment)
            if r.status_code != 201:
                raise AssertionError(f"segment {segment['key']}: {r.status_code} {r.text}")
        for name, definition in campaigns(self.p.clock.now(), self.control_share).items():
            r = await self.p.offers.post("/v1/campaigns", json=definition)
            if r.status_code != 201:
                raise AssertionError(f"campaign {name}: {r.status_code} {r.text}")
            cid = r.json()["id"]
            r = await self.p.offers.post(f"/v1/campaigns/{cid}/activate")
            if r.status_code != 200:
                raise AssertionError(f"activate {name}: {r.status_code} {r.text}")
            self.campaign_ids[name] = cid

    async def campaign_decisions(self, campaign: str) -> list[dict[str, Any]]:
        """Every decision of the campaign, in the order made (GET /v1/campaigns/{id}/decisions, paged)."""
        out: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            params: dict[str, Any] = {"limit": 5000} | ({"after": after} if after is not None else {})
            page = await self.p.get("offers", f"/v1/campaigns/{self.campaign_ids[campaign]}/decisions", **params)
            out += page["items"]
            after = page["next_after"]
            if after is None:
                return out

    async def first_decisions(self, campaign: str, *, arms_only: bool = False) -> dict[str, dict[str, Any]]:
        """customer -> the campaign's first decision about them (by `at`, then the order made); with
        `arms_only`, the first that put them in an arm (requested, control or global control): a
        customer first `outside_window` or `lower_priority` may be treated at a later sweep."""
        first: dict[str, dict[str, Any]] = {}
        for d in sorted(
            await self.campaign_decisions(campaign), key=lambda d: (datetime.fromisoformat(d["at"]), d["id"])
        ):
            if not arms_only or d["outcome"] in ARMS:
                first.setdefault(d["customer_id"], d)
        return first

    async def decisions(self, campaign: str) -> dict[str, str]:
        """customer -> outcome of the campaign's first decision about them (the `why` of each one)."""
        return {cid: d["outcome"] for cid, d in (await self.first_decisions(campaign)).items()}

    async def arm_decisions(self, campaign: str) -> dict[str, dict[str, Any]]:
        """customer -> their first decision that put them in an arm."""
        return await self.first_decisions(campaign, arms_only=True)

    async def assignments(self, campaign: str) -> list[tuple[str, str, datetime]]:
        """(customer, arm, when) of each customer's first decision that put them in an arm."""
        return [
            (cid, ARMS[d["outcome"]], datetime.fromisoformat(d["at"]))
            for cid, d in sorted((await self.arm_decisions(campaign)).items())
        ]

    async def run(self) -> None:
        p, clock = self.p, self.p.clock
        self.t0 = t0 = clock.now()
        await self.configure()
        events = self.history.events
        self.log(f"posting {len(events):,} events through ingest")
        step = max(500, -(-len(events) // 10 // 500) * 500)  # about a tenth, in whole batches of 500
        for i in range(0, len(events), step):
            await p.post_events(events[i : i + step])
            done = min(len(events), i + step)
            bar = "#" * (20 * done // len(events))
            self.log(f"[{bar:<20}] {done:,} of {len(events):,} events posted")
        await p.drain(say=self.log)
        # Day 0: segment entries fired scenarios 1 and 3; the carts' timers are waiting; the
        # triggers sweep finds the clothing customers 7-14 days before their predicted purchase.
        self.sweep_results.append(await p.sweep("offers", "triggers"))
        await p.drain()
        # Day 1 (+25 h): the carts not bought within 24 h get their reminder; loyalty's expiry sweep
        # finds the points that expire within 14 days.
        clock.set(t0 + timedelta(hours=25))
        self.timers_fired = await p.sweep("offers", "timers")
        self.expiry_reminders = (await p.sweep("loyalty", "expiry"))["reminders"]
        self.expiry_reminders_again = (await p.sweep("loyalty", "expiry"))["reminders"]
        # A loyalty member pays part of a 1.00 check with points at the POS, and the till retries.
        members = sorted(self.history.truth.loyalty_paid)
        if members:
            body = {"redemption_id": f"pos-{members[0]}", "customer_id": members[0], "check_amount": "1.00"}
            for _ in range(2):
                r = await p.loyalty.post("/v1/redemptions", json=body)
                if r.status_code not in (200, 201):
                    raise AssertionError(f"redemption: {r.status_code} {r.text}")
                self.redemptions.append(r.json())
        await p.drain()
        # Days 2-4: the goal customers buy again (three purchases meet the goal, one does not); the
        # referred customers sign up with their referrer's code and buy (one purchase, the first a second).
        clock.set(t0 + timedelta(days=4, hours=12))
        await self.goals_and_referrals(t0)
        await p.drain()
        # A goal customer pays part of a 20.00 check with points, then returns it all.
        await self.redeem_then_refund(t0 + timedelta(days=4, hours=11))
        # Day 6: the purchases that followed each campaign decided so far, with its planted uplift
        # (within 4 days of a decision of day 1, 5 of day 0: all before now).
        clock.set(t0 + timedelta(days=6))
        for name, amount, days in UPLIFT[:-2]:
            await self.plant(name, amount, days)
        await p.drain()
        # Days 8-11: the New Year sale at 10:00 local, every day for four days, each customer in
        # their own time zone: the triggers sweep runs every 3 simulated hours.
        clock.set((t0 + timedelta(days=7)).replace(hour=0, minute=0))
        end = (t0 + timedelta(days=12)).replace(hour=0, minute=0)
        while clock.now() < end:
            self.sweep_results.append(await p.sweep("offers", "triggers"))
            await p.drain()
            clock.advance(timedelta(hours=3))
        await p.drain()
        # Day 14: the loyalty members' points (earned 167 days before day 0) have expired; the
        # purchases that followed the retention offers and the New Year sale, with their planted uplift.
        clock.set(t0 + timedelta(days=14))
        self.expired = await p.sweep("loyalty", "expiry")
        for name, amount, days in UPLIFT[-2:]:
            await self.plant(name, amount, days)
        await p.drain()
        await self.settle()
        # Scenario 5: the value tiers and RFM scores, then a dry-run of a discount for everyone.
        self.rfm = await p.sweep("segmentation", "rfm")
        await p.drain()
        r = await p.offers.post("/v1/campaigns/dry-run", json={"definition": DISCOUNT_FOR_ALL})
        if r.status_code != 200:
            raise AssertionError(f"dry-run: {r.status_code} {r.text}")
        self.dry_run = r.json()
        for name, cid in self.campaign_ids.items():
            self.reports[name] = await p.get("offers", f"/v1/campaigns/{cid}/report", cap_percentile=100)

    async def plant(self, name: str, amount: Decimal, within_days: float) -> None:
        """Post the purchases that follow campaign `name`'s decisions, with a planted uplift of `amount`."""
        planted = plant_uplift(
            await self.assignments(name),
            seed=self.seed,
            uplift_amount=amount,
            within_days=within_days,
            prefix=f"up-{name}-{self.seed}",
        )
        self.uplift[name] = planted
        if planted.events:
            await self.p.post_events(planted.events)

    def _purchase(self, cid: str, at: datetime, amount: Decimal, n: int) -> dict[str, Any]:
        return purchase_event(f"later-{self.seed}-{cid}-{n}", cid, at, amount, sku="later", name="Groceries")

    async def goals_and_referrals(self, t0: datetime) -> None:
        truth = self.history.truth
        events: list[dict[str, Any]] = []
        for cid, kind in sorted(truth.goals.items()):
            for n in range(3 if kind == "met" else 1):
                events.append(self._purchase(cid, t0 + timedelta(days=2 + n, hours=2), Decimal("25.00"), n))
        first = True
        for new, referrer in sorted(truth.referrals.items()):
            r = await self.p.loyalty.get(f"/v1/accounts/{referrer}/referral")
            if r.status_code != 200:
                raise AssertionError(f"referral code of {referrer}: {r.status_code} {r.text}")
            code = self.referral_codes[referrer] = r.json()["referral_code"]
            c = self.history.customers[new]
            events.append(
                {
                    "event_id": f"later-{self.seed}-{new}-signup",
                    "type": "customer_updated",
                    "customer_id": new,
                    "occurred_at": (t0 + timedelta(days=2)).isoformat(),
                    "properties": {**sign_up(c), "referred_by": code},
                }
            )
            if new in truth.referred_never_buy:
                continue
            events.append(self._purchase(new, t0 + timedelta(days=3), Decimal("30.00"), 0))
            if first:  # a second purchase earns nobody a second bonus
                events.append(self._purchase(new, t0 + timedelta(days=4), Decimal("30.00"), 1))
                first = False
        events.sort(key=lambda e: (e["occurred_at"], e["event_id"]))
        if events:
            await self.p.post_events(events)
        self.later_events += events

    async def redeem_then_refund(self, at: datetime) -> None:
        met = sorted(c for c, kind in self.history.truth.goals.items() if kind == "met")
        if not met:
            return
        cid = met[0]

        async def balance() -> Decimal:
            return Decimal((await self.p.get("loyalty", f"/v1/accounts/{cid}"))["balance"])

        before = await balance()
        redemption_id = f"pos-refund-{self.seed}-{cid}"
        r = await self.p.loyalty.post(
            "/v1/redemptions", json={"redemption_id": redemption_id, "customer_id": cid, "check_amount": "20.00"}
        )
        if r.status_code not in (200, 201):
            raise AssertionError(f"redemption: {r.status_code} {r.text}")
        redemption = r.json()
        purchase = self._purchase(cid, at, Decimal("20.00"), 9)
        purchase["properties"] |= {"redemption_id": redemption_id, "points_redeemed": redemption["points_applied"]}
        order = purchase["properties"]["order_id"]
        await self.p.post_events([purchase])
        await self.p.drain()
        bought = await balance()
        seen = {e["seq"] for e in (await self.p.get("loyalty", f"/v1/accounts/{cid}/ledger"))["entries"]}
        refund = {
            "event_id": f"{order}-refund",
            "type": "refund",
            "customer_id": cid,
            "occurred_at": (at + timedelta(minutes=30)).isoformat(),
            "properties": {"order_id": order, "amount": "20.00"},
        }
        await self.p.post_events([refund])
        await self.p.drain()
        entries = (await self.p.get("loyalty", f"/v1/accounts/{cid}/ledger"))["entries"]
        self.later_events += [purchase, refund]
        self.refund_check = {
            "customer_id": cid,
            "before": before,
            "redemption": redemption,
            "after_purchase": bought,
            "after_refund": await balance(),
            "refund_entries": [e for e in entries if e["seq"] not in seen],
        }

    async def settle(self, timeout: float = 60, *, max_advance: timedelta = timedelta(hours=36)) -> None:
        """Wait until every message a campaign requested has the notifier's final verdict in the
        campaign's report (sent or better, failed, expired or suppressed). Messages deferred to the
        morning by quiet hours wait for the simulated clock: when nothing has moved for 3 s, the clock
        goes on by an hour, at most `max_advance` in all."""
        deadline = time.monotonic() + timeout
        waiting: dict[str, int] = {}
        advanced = timedelta(0)
        last, moved_at = -1, time.monotonic()
        while time.monotonic() < deadline:
            waiting = {}
            for name, cid in self.campaign_ids.items():
                report = await self.p.get("offers", f"/v1/campaigns/{cid}/report")
                d = report["delivery"]
                final = d["sent"] + d["failed"] + d["expired"] + sum(d["suppressed"].values())
                treated = sum(day["treated"] for day in report["series"])
                if final < treated:
                    waiting[name] = treated - final
            if not waiting:
                return
            left = sum(waiting.values())
            if left != last:
                last, moved_at = left, time.monotonic()
                deadline = max(deadline, moved_at + timeout)
            elif time.monotonic() - moved_at > 3 and advanced < max_advance:
                self.p.clock.advance(timedelta(hours=1))
                advanced += timedelta(hours=1)
                moved_at = time.monotonic()
                await self.p.drain()
            await asyncio.sleep(0.3)
        raise AssertionError(f"messages without a final verdict after {timeout}s: {waiting}")
