"""The chaos run's load, deterministic by seed, and the ground truth computed from it alone.

Customers first (contact data and consents), then a stream of purchases, two trigger events
(`chaos_push`, `chaos_sms`, each sent once or twice to a customer: a campaign with
`once_per_customer` must message them once) and POS redemptions. Amounts are whole cents, one item
per purchase, so the truth is plain arithmetic: loyalty accrues floor(total x rate / point value) to the cent.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

# The programme of the run: 1% back, a point worth 0.01, so a purchase earns its total in points.
BASE_RATE = Decimal("0.01")
POINT_VALUE = Decimal("0.01")
TRIGGERS = {"chaos_push": "push", "chaos_sms": "sms"}


@dataclass
class Redemption:
    redemption_id: str
    customer_id: str
    points: Decimal


@dataclass
class Load:
    seed: int
    customers: list[dict[str, Any]]
    stream: list[dict[str, Any]]
    redemptions: list[Redemption]
    # truth, from the events alone
    orders: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spend: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    points: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    triggered: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # trigger -> customers

    @property
    def events(self) -> int:
        return len(self.customers) + len(self.stream)


def _customer(i: int, prefix: str) -> dict[str, Any]:
    cid = f"{prefix}c{i:06d}"
    return {
        "event_id": f"cu-{cid}",
        "type": "customer_updated",
        "customer_id": cid,
        "properties": {
            "first_name": f"N{i}",
            "phone": f"+4915{i:09d}",
            "push_tokens": [f"tok-{cid}"],
            "consents": {"sms": True, "push": True, "email": False},
            "timezone": "UTC",
        },
    }


def generate(seed: int, events: int, *, prefix: str = "") -> Load:
    """About `events` events: a tenth customers, the rest the stream."""
    rnd = random.Random(seed)
    n_customers = max(20, events // 10)
    customers = [_customer(i, prefix) for i in range(n_customers)]
    ids = [c["customer_id"] for c in customers]
    load = Load(seed=seed, customers=customers, stream=[], redemptions=[])
    pings: dict[str, int] = defaultdict(int)
    for n in range(events - n_customers):
        cid = rnd.choice(ids)
        roll = rnd.random()
        if roll < 0.8:
            cents = rnd.randint(500, 30_000)
            total = Decimal(cents) / 100
            order = f"o-{cid}-{n}"
            load.stream.append(
                {
                    "event_id": f"p-{order}",
                    "type": "purchase",
                    "customer_id": cid,
                    "properties": {
                        "order_id": order,
                        "items": [
                            {"sku": f"sku{cents % 97}", "category": "chaos", "quantity": 1, "unit_price": str(total)}
                        ],
                        "total": str(total),
                        "currency": "EUR",
                    },
                }
            )
            load.orders[cid] += 1
            load.spend[cid] += total
            load.points[cid] += (total * BASE_RATE / POINT_VALUE).quantize(Decimal("0.01"), rounding=ROUND_DOWN)
        else:
            trigger = rnd.choice(sorted(TRIGGERS))
            pings[f"{trigger}:{cid}"] += 1
            load.stream.append(
                {
                    "event_id": f"t-{trigger}-{cid}-{pings[f'{trigger}:{cid}']}",
                    "type": "custom",
                    "customer_id": cid,
                    "properties": {"name": trigger},
                }
            )
            load.triggered[trigger].add(cid)
    # Redemptions by buyers; the till asks for them in the second half of the stream.
    buyers = sorted(load.orders)
    for k, cid in enumerate(rnd.sample(buyers, min(len(buyers), max(5, events // 200)))):
        load.redemptions.append(Redemption(f"r-{prefix}{seed}-{k}", cid, Decimal("0.50")))
    return load
