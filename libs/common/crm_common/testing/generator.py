"""A deterministic generator of customer histories for the reference scenarios (SCENARIOS.md).

`generate(seed, now, scale)` answers a `History`: the events as a POS, a shop and a site post them to
ingest's `POST /v1/events` (sorted by `occurred_at`, each stamped with the customer's own UTC offset,
so "Friday" is the store's Friday), the customers with their contact data, and the *truth*: who the
scenarios' rules must pick and what each must get. The habits of the scenarios are hidden among
ordinary customers, with noise that must not match them: wine bought on two Fridays only or on
Thursdays, regulars who are still active, carts bought within the wait, refunds, customers without
consent, customers with only a phone (SMS) or only a push token, several time zones.

`plant_uplift(assignments, seed, ...)` answers the purchases that follow a campaign's assignments:
every member (treated or control) buys at a base rate, and treated members additionally buy with
the planted uplift probability, so the campaign report's incremental revenue can be checked
against `PlantedUplift.expected_incremental_revenue` (and the realised `incremental_revenue`).

Same seed, same `now` and same scale: byte-identical events (`History.fingerprint()`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

# The default scale of SCENARIOS.md (customers per business); `scale` multiplies it.
DEFAULT_COUNTS = {
    "grocery": 100_000,
    "clothing": 5_000,
    "cleaning": 20_000,
    "loyalty": 10_000,
    "site": 10_000,
    "broadcast": 10_000,
    # SCENARIOS.md gives no size for these three parts of scenarios 4 and 6: a share of their businesses.
    "goals": 2_000,
    "browse": 2_000,
    "referral": 1_000,
}
CODES = {
    "grocery": "g",
    "clothing": "k",
    "cleaning": "c",
    "loyalty": "l",
    "site": "w",
    "broadcast": "b",
    "goals": "q",
    "browse": "v",
    "referral": "r",
}
BAGS = ["Tote Canvas", "Leather Satchel", "Weekender", "Backpack Urban", "Crossbody Mini"]
TIMEZONES = ["Europe/Berlin", "Europe/London", "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
WINES = [
    "Rioja Crianza",
    "Chianti Classico",
    "Sancerre",
    "Malbec Reserva",
    "Riesling Kabinett",
    "Barolo",
    "Pinot Noir",
    "Albarino",
    "Primitivo",
    "Vinho Verde",
]
CLEANING_PRICE = Decimal("50.00")
WINE_PRICE = Decimal("10.00")


def money(v: Decimal | float) -> str:
    return f"{Decimal(v).quantize(Decimal('0.01'))}"


@dataclass
class Customer:
    customer_id: str
    business: str
    timezone: str
    first_name: str
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None
    consents: dict[str, bool] = field(default_factory=dict)

    def channels(self) -> list[str]:
        """The channels a marketing message may use, cheapest first (the notifier's order)."""
        out = []
        if self.push_token and self.consents.get("push"):
            out.append("push")
        if self.email and self.consents.get("email"):
            out.append("email")
        if self.phone and self.consents.get("sms"):
            out.append("sms")
        return out


@dataclass
class Truth:
    """What the scenarios' rules must find in the history."""

    # scenario 1: friday wine lovers -> their own wine; near misses that must not be members
    wine_lovers: dict[str, str] = field(default_factory=dict)
    wine_near_misses: set[str] = field(default_factory=set)
    # scenario 3: lapsed regulars -> "recovery" (low quality rating) or "discount"; still active ones
    lapsed: dict[str, str] = field(default_factory=dict)
    still_active: set[str] = field(default_factory=set)
    # scenario 4: loyalty members -> paid amount of their one purchase (1% accrual), its time
    loyalty_paid: dict[str, Decimal] = field(default_factory=dict)
    loyalty_at: dict[str, datetime] = field(default_factory=dict)
    # scenario 4: weekly regulars whose visits stopped 5 weeks ago -> "met" (3 purchases after the goal
    # offer) or "unmet" (one); the purchases are the World's to post, after the offer
    goals: dict[str, str] = field(default_factory=dict)
    # scenario 6: browsers of bags -> "abandoned" (reminder due) or "bought" (within the wait), the
    # names they viewed, when
    browses: dict[str, str] = field(default_factory=dict)
    browsed: dict[str, list[str]] = field(default_factory=dict)
    browse_at: dict[str, datetime] = field(default_factory=dict)
    # scenario 6: a new customer -> the customer whose referral code they sign up with (the World
    # reads the code from loyalty and posts the sign-up); those who never buy earn nobody a bonus
    referrals: dict[str, str] = field(default_factory=dict)
    referred_never_buy: set[str] = field(default_factory=set)
    # scenario 6: cart owners -> "abandoned" (reminder due) or "bought" (bought within the wait)
    carts: dict[str, str] = field(default_factory=dict)
    cart_at: dict[str, datetime] = field(default_factory=dict)
    anonymous_links: dict[str, str] = field(default_factory=dict)  # anonymous_id -> customer
    # scenario 7: broadcast audience -> the channel the notifier should choose (None: no consent)
    broadcast: dict[str, str | None] = field(default_factory=dict)
    # scenario 5: grocery customers who buy only at a loss to the shop (the unprofitable tier)
    deal_hunters: set[str] = field(default_factory=set)
    # scenario 5: revenue per customer (net of refunds), for the Pareto share
    revenue: dict[str, Decimal] = field(default_factory=dict)
    refunded_orders: set[str] = field(default_factory=set)

    def pareto_share(self, top: float = 0.2) -> Decimal:
        values = sorted(self.revenue.values(), reverse=True)
        if not values:
            return Decimal(0)
        k = max(1, round(len(values) * top))
        total = sum(values, Decimal(0))
        return sum(values[:k], Decimal(0)) / total if total else Decimal(0)


@dataclass
class History:
    seed: int
    now: datetime
    events: list[dict[str, Any]]
    customers: dict[str, Customer]
    truth: Truth

    def of(self, business: str) -> list[Customer]:
        return [c for c in self.customers.values() if c.business == business]

    def fingerprint(self) -> str:
        return hashlib.sha256(orjson.dumps(self.events, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def batches(self, size: int = 500) -> Iterable[list[dict[str, Any]]]:
        for i in range(0, len(self.events), size):
            yield self.events[i : i + size]


class _Builder:
    def __init__(self, seed: int, now: datetime, prefix: str) -> None:
        self.rng = random.Random(seed)
        self.now = now.astimezone(UTC)
        self.prefix = prefix
        self.events: list[dict[str, Any]] = []
        self.customers: dict[str, Customer] = {}
        self.truth = Truth()
        self._n = 0

    # -- events -----------------------------------------------------------------------------------

    def _id(self, kind: str) -> str:
        self._n += 1
        return f"{self.prefix}-{kind}-{self._n:07d}"

    def local(self, c: Customer, at: datetime) -> str:
        return at.astimezone(ZoneInfo(c.timezone)).isoformat()

    def event(self, type_: str, c: Customer | None, at: datetime, props: dict[str, Any], **extra: Any) -> None:
        ev: dict[str, Any] = {
            "event_id": self._id(type_[:2]),
            "type": type_,
            "occurred_at": self.local(c, at) if c else at.isoformat(),
            "properties": props,
        }
        if c is not None:
            ev["customer_id"] = c.customer_id
        ev.update(extra)
        self.events.append(ev)

    def customer(
        self, business: str, i: int, *, channels: str = "email", tz: str | None = None, signed_up: bool = True
    ) -> Customer:
        """A customer and, when `signed_up`, their customer_updated of 400 days ago (contact data, consents)."""
        cid = f"{self.prefix}-{CODES[business]}{i:06d}"
        c = Customer(cid, business, tz or self.rng.choice(TIMEZONES), f"{business.title()}{i}")
        consents: dict[str, bool] = {}
        if "email" in channels:
            c.email = f"{cid}@example.com"
            consents["email"] = True
        if "sms" in channels:
            c.phone = f"+4915{self.rng.randrange(10**8, 10**9)}"
            consents["sms"] = True
        if "push" in channels:
            c.push_token = f"tok-{cid}"
            consents["push"] = True
        if "noconsent" in channels:  # an address but no consent given
            c.email = c.email or f"{cid}@example.com"
            consents = {k: False for k in consents} | {"email": False}
        c.consents = consents
        self.customers[cid] = c
        if signed_up:
            self.event("customer_updated", c, self.now - timedelta(days=400), sign_up(c))
        return c

    def purchase(self, c: Customer, at: datetime, items: list[dict[str, Any]], *, refund: Decimal | None = None) -> str:
        total = sum(
            (
                Decimal(str(i["unit_price"])) * Decimal(str(i.get("quantity", 1))) - Decimal(str(i.get("discount", 0)))
                for i in items
            ),
            Decimal(0),
        )
        order = self._id("o")
        self.event(
            "purchase",
            c,
            at,
            {"order_id": order, "items": items, "total": money(total), "currency": "EUR"},
            store_id=f"{self.prefix}-store",
        )
        net = total
        if refund:
            self.event("refund", c, at + timedelta(days=2), {"order_id": order, "amount": money(refund)})
            self.truth.refunded_orders.add(order)
            net -= refund
        self.truth.revenue[c.customer_id] = self.truth.revenue.get(c.customer_id, Decimal(0)) + net
        return order

    def basket(self, low: float = 12, high: float = 28, *, deal: bool = False) -> dict[str, Any]:
        price = Decimal(money(self.rng.uniform(low, high)))
        item = {
            "sku": f"groc-{self.rng.randint(1, 60)}",
            "name": "Groceries",
            "category": "grocery",
            "quantity": 1,
            "unit_price": money(price),
            "cost": "9.00",
        }
        if deal:  # a deal hunter: pays less than the goods cost (negative margin after discounts)
            item["discount"] = money(price - Decimal("6.00"))
        return item

    # -- businesses -------------------------------------------------------------------------------

    def fridays(self, c: Customer, weeks: int) -> list[datetime]:
        """The customer's local Fridays at 18:00 of the last `weeks` weeks, newest last, in UTC."""
        tz = ZoneInfo(c.timezone)
        today = self.now.astimezone(tz)
        last = today - timedelta(days=(today.weekday() - 4) % 7 or 7)
        out = [(last - timedelta(weeks=w)).replace(hour=18, minute=0, second=0, microsecond=0) for w in range(weeks)]
        return [d.astimezone(UTC) for d in reversed(out) if d.astimezone(UTC) < self.now]

    def grocery(self, n: int) -> None:
        """Twice-weekly shoppers (check ~20). A fifth are Friday wine lovers who buy their own wine on
        3-6 of the last 8 Fridays; a few buy wine on only two Fridays, or on Thursdays (not members);
        a tenth are deal hunters who only buy below cost (the unprofitable tier)."""
        for i in range(n):
            kind = i % 10
            c = self.customer("grocery", i, channels="noconsent" if i % 23 == 7 else "email")
            wine = WINES[self.rng.randrange(len(WINES))]
            fridays = self.fridays(c, 8)
            wine_fridays: set[int] = set()
            if kind in (0, 5):  # a Friday wine lover: always the same wine
                wine_fridays = set(self.rng.sample(range(len(fridays) - 3, len(fridays)), 3))
                wine_fridays |= {w for w in range(len(fridays) - 3) if self.rng.random() < 0.4}
                self.truth.wine_lovers[c.customer_id] = wine
            elif kind == 3:  # near miss: two Fridays only
                wine_fridays = {len(fridays) - 1, len(fridays) - 4}
                self.truth.wine_near_misses.add(c.customer_id)
            deal = kind == 9
            if deal:
                self.truth.deal_hunters.add(c.customer_id)
            for w, friday in enumerate(fridays):
                items = [self.basket(deal=deal)]
                if w in wine_fridays:
                    items.append(
                        {
                            "sku": f"wine-{WINES.index(wine)}",
                            "name": wine,
                            "category": "wine",
                            "quantity": 1,
                            "unit_price": money(WINE_PRICE),
                            "cost": "6.00",
                        }
                    )
                elif kind == 8 and w % 2:  # wine on Thursdays: not a Friday habit
                    items.append({"sku": "wine-0", "name": WINES[0], "category": "wine", "unit_price": "10.00"})
                    self.purchase(c, friday - timedelta(days=1), items)
                    continue
                line = Decimal(items[0]["unit_price"]) - Decimal(items[0].get("discount", "0"))
                refund = line if self.rng.random() < 0.02 else None  # the first line returned
                self.purchase(c, friday - timedelta(hours=self.rng.randint(0, 3)), items, refund=refund)
                # the other visit of the week, on Tuesday
                self.purchase(c, friday - timedelta(days=3, hours=self.rng.randint(0, 5)), [self.basket(deal=deal)])

    def clothing(self, n: int) -> None:
        """Two years of two white and one blue shirt, size M, about every 90 days (~800 a year). The
        last visit was 78-81 days ago, so the next is predicted 8-13 days from now; every fifth
        bought again last week (already bought in the cycle)."""
        for i in range(n):
            c = self.customer("clothing", i, channels="email")
            last = self.now - timedelta(days=78 + i % 4)
            for k in range(8, -1, -1):
                at = last - timedelta(days=90 * k + self.rng.randint(-3, 3))
                self.purchase(
                    c,
                    at,
                    [
                        {
                            "sku": "shirt-w-m",
                            "name": "Shirt white M",
                            "category": "shirts",
                            "quantity": 2,
                            "unit_price": "70.00",
                            "size": "M",
                            "color": "white",
                        },
                        {
                            "sku": "shirt-b-m",
                            "name": "Shirt blue M",
                            "category": "shirts",
                            "quantity": 1,
                            "unit_price": "60.00",
                            "size": "M",
                            "color": "blue",
                        },
                    ],
                )
            if i % 5 == 4:
                self.purchase(
                    c,
                    self.now - timedelta(days=5),
                    [
                        {
                            "sku": "shirt-w-m",
                            "name": "Shirt white M",
                            "category": "shirts",
                            "unit_price": "70.00",
                            "size": "M",
                            "color": "white",
                        }
                    ],
                )

    def cleaning(self, n: int) -> None:
        """Monthly cleanings (50) for 4 months, stopped ~3 months ago; a quarter left a low `quality`
        rating; a third have only a phone (SMS). Every seventh is still active (not lapsed)."""
        for i in range(n):
            channels = "sms" if i % 3 == 1 else "email+sms"
            c = self.customer("cleaning", i, channels=channels)
            active = i % 7 == 6
            last = self.now - timedelta(days=(10 if active else 95 + self.rng.randint(0, 10)))
            for m in range(4):
                self.purchase(
                    c,
                    last - timedelta(days=30 * (3 - m)),
                    [
                        {
                            "sku": "cleaning",
                            "name": "Home cleaning",
                            "category": "cleaning",
                            "unit_price": money(CLEANING_PRICE),
                            "cost": "35.00",
                        }
                    ],
                )
            if active:
                self.truth.still_active.add(c.customer_id)
                continue
            if i % 4 == 0:
                self.event(
                    "feedback",
                    c,
                    last + timedelta(days=1),
                    {"rating": 2, "topic": "quality", "comment": "missed the kitchen"},
                )
                self.truth.lapsed[c.customer_id] = "recovery"
            else:
                if i % 4 == 2:  # a good rating on another topic changes nothing
                    self.event("feedback", c, last + timedelta(days=1), {"rating": 5, "topic": "service"})
                self.truth.lapsed[c.customer_id] = "discount"

    def loyalty(self, n: int, days_ago: int = 167) -> None:
        """Members whose one purchase was `days_ago` days ago (at 167, 13 days before a 180-day
        expiry); amounts 40-400, so some cross into the top tier's 3%."""
        for i in range(n):
            c = self.customer("loyalty", i, channels="email")
            at = self.now - timedelta(days=days_ago, hours=self.rng.randint(0, 5))
            amount = Decimal(self.rng.randrange(40, 400))
            self.purchase(c, at, [{"sku": "lp", "name": "Goods", "category": "grocery", "unit_price": money(amount)}])
            self.truth.loyalty_paid[c.customer_id] = amount
            self.truth.loyalty_at[c.customer_id] = at

    def site(self, n: int, hours_ago: float = 1.0) -> None:
        """Known customers who browse shoes and leave a cart `hours_ago` hours ago; every third buys
        it within the wait (no reminder). Every fourth browsed anonymously first and was linked later."""
        for i in range(n):
            c = self.customer("site", i, channels="email" if i % 5 else "push")
            at = self.now - timedelta(hours=hours_ago)
            sku = f"shoe-{self.rng.randint(1, 30)}"
            item = {"sku": sku, "name": f"Runner {sku}", "category": "shoes", "unit_price": "80.00"}
            if i % 4 == 0:
                anon = f"{self.prefix}-anon-{i}"
                self.truth.anonymous_links[anon] = c.customer_id
                self.event(
                    "product_viewed",
                    None,
                    at - timedelta(hours=2),
                    {"sku": sku, "category": "shoes", "price": "80.00"},
                    anonymous_id=anon,
                )
                self.event("site_visit", c, at - timedelta(hours=1), {"page": "/login"}, anonymous_id=anon)
            self.event("product_viewed", c, at - timedelta(minutes=5), {"sku": sku, "category": "shoes"})
            self.event("cart_updated", c, at, {"items": [item], "total": "80.00"})
            self.truth.cart_at[c.customer_id] = at
            if i % 3 == 2:
                self.purchase(c, at + timedelta(minutes=30), [item])
                self.truth.carts[c.customer_id] = "bought"
            else:
                self.truth.carts[c.customer_id] = "abandoned"

    def goals(self, n: int) -> None:
        """Weekly shoppers for 20 weeks whose visits stopped 35-38 days ago (below their usual): the
        `visits_dropped` segment, a personal goal. Two in three will meet it, one in three will not."""
        for i in range(n):
            c = self.customer("goals", i, channels="email")
            last = self.now - timedelta(days=35 + i % 4, hours=self.rng.randint(0, 5))
            for w in range(20):
                self.purchase(c, last - timedelta(weeks=w), [self.basket()])
            self.truth.goals[c.customer_id] = "unmet" if i % 3 == 2 else "met"

    def browse(self, n: int, hours_ago: float = 1.0) -> None:
        """Known customers who view two bags `hours_ago` hours ago and leave no cart; every third buys
        one of them within the wait (no reminder). E-mail or push only."""
        for i in range(n):
            c = self.customer("browse", i, channels="push" if i % 4 == 3 else "email")
            at = self.now - timedelta(hours=hours_ago)
            picks = self.rng.sample(range(len(BAGS)), 2)
            names = [BAGS[k] for k in picks]
            for k, name in zip(picks, names, strict=True):
                self.event(
                    "product_viewed",
                    c,
                    at - timedelta(minutes=10 * k),
                    {"sku": f"bag-{k}", "name": name, "category": "bags", "price": "45.00"},
                )
            self.truth.browsed[c.customer_id] = names
            self.truth.browse_at[c.customer_id] = at
            if i % 3 == 2:
                item = {"sku": f"bag-{picks[0]}", "name": names[0], "category": "bags", "unit_price": "45.00"}
                self.purchase(c, at + timedelta(minutes=40), [item])
                self.truth.browses[c.customer_id] = "bought"
            else:
                self.truth.browses[c.customer_id] = "abandoned"

    def referral(self, n: int) -> None:
        """Customers who bought once 60 days ago (with a referral code), each bringing one new customer
        who signs up with that code; every fourth new customer never buys. The new customers' sign-up
        and purchases are the World's to post (the code is loyalty's)."""
        for i in range(n):
            referrer = self.customer("referral", 2 * i, channels="email")
            self.purchase(referrer, self.now - timedelta(days=60, hours=self.rng.randint(0, 5)), [self.basket()])
            new = self.customer("referral", 2 * i + 1, channels="email", signed_up=False)
            self.truth.referrals[new.customer_id] = referrer.customer_id
            if i % 4 == 3:
                self.truth.referred_never_buy.add(new.customer_id)

    def broadcast(self, n: int) -> None:
        """A mailing list across time zones: push-only, e-mail, SMS-only, and no consent at all."""
        plans = ["push+email", "email", "sms", "email+sms", "noconsent"]
        for i in range(n):
            c = self.customer("broadcast", i, channels=plans[i % len(plans)], tz=TIMEZONES[i % len(TIMEZONES)])
            gift = self.basket(20, 120) | {"sku": f"gift-{i % 7}", "name": "Gift box", "category": "gifts"}
            self.purchase(c, self.now - timedelta(days=20 + i % 9), [gift])
            chans = c.channels()
            self.truth.broadcast[c.customer_id] = chans[0] if chans else None


def sign_up(c: Customer) -> dict[str, Any]:
    """The properties of the customer_updated that makes `c` known: name, time zone, contacts, consents."""
    props: dict[str, Any] = {"first_name": c.first_name, "timezone": c.timezone, "consents": c.consents}
    if c.email:
        props["email"] = c.email
    if c.phone:
        props["phone"] = c.phone
    if c.push_token:
        props["push_tokens"] = [c.push_token]
    return props


def purchase_event(
    order: str, customer_id: str, at: datetime, amount: Decimal, *, sku: str, name: str
) -> dict[str, Any]:
    """A purchase of one grocery item for `amount`, the order id as its event id (what follows the history)."""
    return {
        "event_id": order,
        "type": "purchase",
        "customer_id": customer_id,
        "occurred_at": at.isoformat(),
        "properties": {
            "order_id": order,
            "items": [{"sku": sku, "name": name, "category": "grocery", "unit_price": money(amount)}],
            "total": money(amount),
            "currency": "EUR",
        },
    }


def scaled(scale: float | dict[str, int]) -> dict[str, int]:
    if isinstance(scale, dict):
        return {k: int(scale.get(k, 0)) for k in DEFAULT_COUNTS}
    return {k: max(1, round(v * scale)) for k, v in DEFAULT_COUNTS.items()}


def generate(
    seed: int = 42,
    now: datetime | None = None,
    scale: float | dict[str, int] = 0.01,
    *,
    prefix: str | None = None,
) -> History:
    """A history of the businesses of SCENARIOS.md; `scale` is a fraction of the default counts or
    explicit counts per business (`{"grocery": 40, "cleaning": 12}`; missing ones are 0)."""
    now = now or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    b = _Builder(seed, now, prefix or f"s{seed}")
    counts = scaled(scale)
    for business, count in counts.items():
        if count:
            getattr(b, business)(count)
    b.events.sort(key=lambda e: (datetime.fromisoformat(e["occurred_at"]), e["event_id"]))
    return History(seed, now, b.events, b.customers, b.truth)


@dataclass
class PlantedUplift:
    treated: int
    control: int
    expected_incremental_revenue: Decimal  # treated x uplift_rate x uplift_amount
    incremental_revenue: Decimal  # the uplift purchases actually drawn
    events: list[dict[str, Any]]


def plant_uplift(
    assignments: Iterable[tuple[str, str, datetime]],
    *,
    seed: int,
    base_rate: float = 0.2,
    base_amount: Decimal = Decimal("40.00"),
    uplift_rate: float = 0.3,
    uplift_amount: Decimal = Decimal("30.00"),
    within_days: float = 5,
    timezone: str = "UTC",
    prefix: str = "up",
) -> PlantedUplift:
    """Purchases after each assignment (`(customer, arm, at)`, arm `treated` or `control`/
    `global_control`), inside `within_days` (keep it under the campaign's attribution window).
    Everyone buys `base_amount` with `base_rate`; treated members also buy `uplift_amount` with
    `uplift_rate`. The draws depend on the seed and the customer only, not on the order given."""
    treated = control = 0
    planted = Decimal(0)
    events: list[dict[str, Any]] = []
    tz = ZoneInfo(timezone)
    for cid, arm, at in sorted(assignments):
        rng = random.Random(f"{seed}:{cid}")
        is_treated = arm == "treated"
        treated += is_treated
        control += not is_treated
        amounts = []
        if rng.random() < base_rate:
            amounts.append(base_amount)
        if rng.random() < uplift_rate and is_treated:
            amounts.append(uplift_amount)
            planted += uplift_amount
        for k, amount in enumerate(amounts):
            when = at + timedelta(hours=rng.uniform(1, within_days * 24 - 1))
            order = f"{prefix}-{cid}-{k}"
            events.append(purchase_event(order, cid, when.astimezone(tz), amount, sku="after", name="Goods"))
    events.sort(key=lambda e: (e["occurred_at"], e["event_id"]))
    return PlantedUplift(
        treated,
        control,
        (uplift_amount * treated * Decimal(str(uplift_rate))).quantize(Decimal("0.01")),
        planted,
        events,
    )
