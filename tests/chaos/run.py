"""One chaos run: configure, drive the load through ingest while the controller injects faults,
drain, and compare every effect with the truth of `load.py`.

Printed figures (one block at the end): events, faults injected by kind, outage seconds, time to
recover (end of the last fault to drained), and lost / doubled effects per kind.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaProducer

from crm_common.devstack import drain
from crm_common.settings import TOPIC_DLQ, TOPIC_EVENTS
from crm_common.testing.helpers import TEST_API_KEY, read_topic

from .load import BASE_RATE, POINT_VALUE, TRIGGERS, Load
from .stack import AUTH, INGEST_KEY, SERVICES, ChaosStack, say

# Consumers of crm.events.v1: each dead-letters a poison message once.
EVENT_CONSUMERS = 4
POISON = [b"{not json", b'{"type": "purchase", "customer_id": "x"}', b"[1, 2, 3]"]
FINAL = ("sent", "delivered", "failed", "suppressed", "expired")


@dataclass(frozen=True)
class Plan:
    """What the controller does: how many kills, and the ranges (s) of each outage and the gaps."""

    kills: int
    broker_pause_s: tuple[float, float]
    db_refusal_s: tuple[float, float]
    provider_s: tuple[float, float]
    gap_s: tuple[float, float]
    # kill -9 of the broker, restarted empty; the watch of the stack detects it and recovers.
    broker_kills: int = 1


@dataclass
class Fault:
    kind: str
    target: str
    started: float
    seconds: float


@dataclass
class Figures:
    events: int = 0
    accepted: int = 0
    faults: list[Fault] = field(default_factory=list)
    recover_s: float = 0.0
    lost: dict[str, int] = field(default_factory=dict)
    doubled: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def report(self, seed: int, duration: float) -> str:
        kinds = Counter(f.kind for f in self.faults)
        outage = sum(f.seconds for f in self.faults if f.kind not in ("kill", "broker_kill"))
        lost_broker = [f.seconds for f in self.faults if f.kind == "broker_kill"]
        down = sum(f.seconds for f in self.faults if f.kind == "kill")
        lines = [
            f"CHAOS seed={seed} events={self.events} accepted={self.accepted} duration={duration:.0f}s",
            "  faults: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())),
            f"  outage seconds (broker paused, database refusing, providers failing): {outage:.1f}",
            f"  services down after kill -9 until ready again: {down:.1f} s in total",
            "  broker kill -9, restarted empty, until recovered (topics, services restarted, replay, republish): "
            + (", ".join(f"{s:.1f} s" for s in lost_broker) or "none"),
            f"  time to recover (last fault over -> drained, every message final): {self.recover_s:.1f} s",
        ]
        for kind in sorted(self.lost.keys() | self.doubled.keys()):
            lines.append(f"  {kind:<34} lost {self.lost.get(kind, 0):>6}   doubled {self.doubled.get(kind, 0):>6}")
        lines.append(f"  TOTAL lost={sum(self.lost.values())} doubled={sum(self.doubled.values())}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class ChaosRun:
    def __init__(self, stack: ChaosStack, load: Load, plan: Plan, *, batch: int = 250, posters: int = 4) -> None:
        self.stack = stack
        self.load = load
        self.plan = plan
        self.batch = batch
        self.posters = posters
        self.rnd = random.Random(load.seed)
        self.figures = Figures(events=load.events + len(POISON))
        self.campaigns: dict[str, str] = {}  # trigger -> campaign id
        self.redeemed: dict[str, Decimal] = {}  # redemption id -> points applied (the till's receipts)
        self.refused: dict[str, int] = {}
        self.posted = 0
        # Set once the broker's kill is over: what is produced straight onto a topic (the poison)
        # is not the platform's to restore, so it comes after the loss.
        self.broker_lost = asyncio.Event()
        if not plan.broker_kills:
            self.broker_lost.set()

    # -- setup ---------------------------------------------------------------------------------

    async def configure(self) -> None:
        """Templates, one campaign per trigger (once per customer, no control group), the programme."""
        urls = self.stack.urls
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
            r = await http.put(
                f"{urls['loyalty']}/v1/programme",
                json={"base_rate": str(BASE_RATE), "point_value": str(POINT_VALUE), "goals": None},
            )
            assert r.status_code == 200, r.text
            for trigger, channel in TRIGGERS.items():
                r = await http.post(
                    f"{urls['notifier']}/v1/templates",
                    json={
                        "key": trigger,
                        "channel": channel,
                        "locale": "en",
                        "subject": "Hi",
                        "body": "Hello {{ first_name }}",
                        "variables": ["first_name"],
                    },
                )
                assert r.status_code == 201, r.text
                r = await http.post(
                    f"{urls['offers']}/v1/campaigns",
                    json={
                        "name": trigger,
                        "trigger": {"kind": "event", "event_type": "custom", "name": trigger},
                        "offer": {"kind": "info"},
                        "delivery": {"template": trigger, "channel": channel},
                        "limits": {"once_per_customer": True, "collision_minutes": 0},
                        "control_share": 0,
                    },
                )
                assert r.status_code == 201, r.text
                self.campaigns[trigger] = r.json()["id"]
                r = await http.post(f"{urls['offers']}/v1/campaigns/{self.campaigns[trigger]}/activate")
                assert r.status_code == 200, r.text

    # -- load ----------------------------------------------------------------------------------

    async def post_until_accepted(self, http: httpx.AsyncClient, events: list[dict[str, Any]]) -> None:
        """Post one batch as a POS would: resend the same events until ingest answers 202."""
        delay = 0.2
        while True:
            stamped = [{**e, "occurred_at": _now()} for e in events]
            try:
                r = await http.post("/v1/events", content=orjson.dumps({"events": stamped}))
                if r.status_code == 202:
                    body = r.json()
                    assert not body["rejected"], r.text[:500]
                    self.figures.accepted += body["accepted"] + body["duplicates"]
                    self.posted += len(events)
                    return
                if r.status_code < 500 and r.status_code != 429:
                    raise AssertionError(f"ingest answered {r.status_code}: {r.text[:500]}")
            except httpx.HTTPError:
                pass
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def post_all(self, events: list[dict[str, Any]]) -> None:
        """Post in `posters` shards by customer, each shard's batches in order (a customer's events stay ordered)."""
        shards: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            shards[zlib.crc32(e["customer_id"].encode()) % self.posters].append(e)

        async def shard(items: list[dict[str, Any]]) -> None:
            headers = {"Authorization": f"Bearer {INGEST_KEY}", "Content-Type": "application/json"}
            async with httpx.AsyncClient(base_url=self.stack.urls["ingest"], headers=headers, timeout=20) as http:
                for i in range(0, len(items), self.batch):
                    await self.post_until_accepted(http, items[i : i + self.batch])

        await asyncio.gather(*(shard(items) for items in shards.values()))

    async def till(self) -> None:
        """The POS redeems points in the second half of the stream, retrying each redemption (same id)
        until loyalty gives a definite answer: applied (201, or 200 for a replay) or refused (4xx)."""
        while self.posted < len(self.load.stream) // 2:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=self.stack.urls["loyalty"], headers=AUTH, timeout=10) as http:
            for red in self.load.redemptions:
                body = {
                    "redemption_id": red.redemption_id,
                    "customer_id": red.customer_id,
                    "check_amount": "100.00",
                    "points": str(red.points),
                }
                while True:
                    try:
                        r = await http.post("/v1/redemptions", json=body)
                    except httpx.HTTPError:
                        await asyncio.sleep(0.5)
                        continue
                    if r.status_code in (200, 201):
                        self.redeemed[red.redemption_id] = Decimal(r.json()["points_applied"])
                        break
                    if 400 <= r.status_code < 500 and r.status_code != 429:
                        self.refused[red.redemption_id] = r.status_code
                        break
                    await asyncio.sleep(0.5)

    async def poison(self) -> None:
        """Unprocessable messages straight onto crm.events.v1: each consumer must dead-letter them."""
        while self.posted < len(self.load.stream) // 3:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        await self.broker_lost.wait()
        producer = AIOKafkaProducer(bootstrap_servers=self.stack.broker.bootstrap, acks="all", request_timeout_ms=5000)
        while True:
            try:
                await producer.start()
                break
            except Exception:
                await asyncio.sleep(1)
        try:
            for i, raw in enumerate(POISON):
                while True:
                    try:
                        await asyncio.wait_for(producer.send_and_wait(TOPIC_EVENTS, raw, key=f"poison{i}".encode()), 10)
                        break
                    except Exception:
                        await asyncio.sleep(1)
        finally:
            await producer.stop()

    # -- faults --------------------------------------------------------------------------------

    async def controller(self) -> None:
        """Inject the plan's faults in a seeded order with seeded gaps and durations."""
        p, rnd = self.plan, self.rnd
        kinds = ["broker_pause", "db_refusal", "provider_500", "provider_hang"] + ["kill"] * p.kills
        rnd.shuffle(kinds)
        # The broker's kill comes first, while the load is still being posted and applied: a loss
        # with messages in flight, not after everything was consumed.
        kinds = ["broker_kill"] * p.broker_kills + kinds
        for kind in kinds:
            await asyncio.sleep(rnd.uniform(*p.gap_s))
            started = time.monotonic()
            if kind == "kill":
                target = rnd.choice(SERVICES)
                pid = self.stack.kill(target)
                say(f"kill -9 {target} (pid {pid})")
                await asyncio.sleep(0.3)
                seconds = 0.3 + await self.stack.wait_ready(target, timeout=120)
            elif kind == "broker_kill":
                target = "broker"
                say("kill -9 broker (the supervisor restarts it, empty)")
                self.figures.notes.append(
                    f"broker killed with {self.posted} of {len(self.load.stream)} events of the stream accepted"
                )
                seconds = await self.stack.kill_broker()
                self.broker_lost.set()
            elif kind == "broker_pause":
                target, seconds = "broker", rnd.uniform(*p.broker_pause_s)
                say(f"SIGSTOP broker for {seconds:.1f} s")
                self.stack.pause_broker()
                try:
                    await asyncio.sleep(seconds)
                finally:
                    self.stack.resume_broker()
            elif kind == "db_refusal":
                target, seconds = "postgresql", rnd.uniform(*p.db_refusal_s)
                say(f"PostgreSQL refuses the services' connections for {seconds:.1f} s")
                await self.stack.refuse_database(seconds)
            else:
                target = rnd.choice(["sms", "push"])
                provider = self.stack.sms if target == "sms" else self.stack.push
                seconds = rnd.uniform(*p.provider_s)
                mode = "500" if kind == "provider_500" else "hang"
                say(f"{target} provider {'answers 500' if mode == '500' else 'hangs'} for {seconds:.1f} s")
                with self.stack.provider_failing(provider, mode):
                    await asyncio.sleep(seconds)
            self.figures.faults.append(Fault(kind, target, started, time.monotonic() - started))

    # -- the run -------------------------------------------------------------------------------

    async def run(self, drain_timeout: float = 600) -> Figures:
        await self.configure()
        say(f"{len(self.load.customers)} customers first, then {len(self.load.stream)} events under faults")
        await self.post_all(self.load.customers)
        assert await drain(self.stack.ports, TEST_API_KEY, timeout=drain_timeout, say=say), "not drained before chaos"
        self.posted = 0
        chaos = asyncio.create_task(self.controller())
        await asyncio.gather(self.post_all(self.load.stream), self.till(), self.poison(), chaos)
        calm = time.monotonic()
        say(f"load and faults done; {len(self.redeemed)} redemptions applied, {len(self.refused)} refused")
        for s in SERVICES:
            await self.stack.wait_ready(s, timeout=120)
        assert await drain(self.stack.ports, TEST_API_KEY, timeout=drain_timeout, say=say), "pipeline not drained"
        await self._messages_final(timeout=drain_timeout)
        self.figures.recover_s = time.monotonic() - calm
        for r in self.stack.recovery.recoveries:
            self.figures.notes.append(
                f"broker loss detected ({r.reason}); ingest replayed {r.replayed}, republished {r.republished}"
            )
        await self.check()
        return self.figures

    async def _messages_final(self, timeout: float) -> None:
        conn = await self.stack.db("notifier")
        try:
            deadline = time.monotonic() + timeout
            while True:
                waiting = await conn.fetchval("SELECT count(*) FROM messages WHERE state <> ALL($1::text[])", FINAL)
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{waiting} messages not in a final state after {timeout} s")
                await asyncio.sleep(0.5)
        finally:
            await conn.close()

    # -- the truth -----------------------------------------------------------------------------

    def _count(self, kind: str, expected: int, got: int) -> None:
        self.figures.lost[kind] = self.figures.lost.get(kind, 0) + max(0, expected - got)
        self.figures.doubled[kind] = self.figures.doubled.get(kind, 0) + max(0, got - expected)

    async def check(self) -> None:
        for kind in (
            "profile spend (customers off)",
            "loyalty points (customers off)",
            "loyalty balance (customers off)",
        ):
            self._count(kind, 0, 0)
        await self._check_profiles()
        await self._check_loyalty()
        await self._check_messages()
        await self._check_dlq()

    async def _check_profiles(self) -> None:
        """Every purchase counted once in its customer's profile: orders and revenue."""
        conn = await self.stack.db("segmentation")
        try:
            rows = {r["customer_id"]: r for r in await conn.fetch("SELECT customer_id, orders, revenue FROM profiles")}
        finally:
            await conn.close()
        for c in self.load.customers:
            cid = c["customer_id"]
            row = rows.get(cid)
            self._count("profile (customer)", 1, 1 if row else 0)
            orders, revenue = (row["orders"], row["revenue"]) if row else (0, Decimal(0))
            self._count("profile order", self.load.orders.get(cid, 0), orders)
            if revenue != self.load.spend.get(cid, Decimal(0)):
                self.figures.notes.append(f"{cid}: revenue {revenue} != {self.load.spend.get(cid, 0)}")
                self._count("profile spend (customers off)", 0, 1)

    async def _check_loyalty(self) -> None:
        """Every purchase accrued once (entries and points), every applied redemption debited once."""
        conn = await self.stack.db("loyalty")
        try:
            accruals = {
                r["customer_id"]: r
                for r in await conn.fetch(
                    "SELECT customer_id, count(*) AS n, sum(points) AS points FROM ledger"
                    " WHERE kind = 'accrual' GROUP BY customer_id"
                )
            }
            debits = {
                r["redemption_id"]: r
                for r in await conn.fetch(
                    "SELECT redemption_id, count(*) AS n, -sum(points) AS points FROM ledger"
                    " WHERE kind = 'redemption' GROUP BY redemption_id"
                )
            }
            balances = {
                r["customer_id"]: r["balance"] for r in await conn.fetch("SELECT customer_id, balance FROM accounts")
            }
        finally:
            await conn.close()
        redeemed_by: dict[str, Decimal] = defaultdict(Decimal)
        for red in self.load.redemptions:
            applied = self.redeemed.get(red.redemption_id)
            row = debits.get(red.redemption_id)
            got = row["n"] if row else 0
            self._count("loyalty redemption", 1 if applied else 0, got)
            if applied and row and row["points"] != applied:
                self.figures.notes.append(f"{red.redemption_id}: debited {row['points']} != applied {applied}")
                self._count("loyalty redemption points", 0, 1)
            redeemed_by[red.customer_id] += applied or Decimal(0)
        for cid, orders in self.load.orders.items():
            row = accruals.get(cid)
            self._count("loyalty accrual", orders, row["n"] if row else 0)
            points = row["points"] if row else Decimal(0)
            if points != self.load.points[cid]:
                self._count("loyalty points (customers off)", 0, 1)
                self.figures.notes.append(f"{cid}: accrued {points} != {self.load.points[cid]}")
            expected_balance = self.load.points[cid] - redeemed_by[cid]
            if balances.get(cid, Decimal(0)) != expected_balance:
                self._count("loyalty balance (customers off)", 0, 1)
                self.figures.notes.append(f"{cid}: balance {balances.get(cid)} != {expected_balance}")

    async def _check_messages(self) -> None:
        """One message per (customer, triggered campaign), in a final state, sent to the provider under
        one id (a provider may have seen that id twice after a timeout: the same message, its key)."""
        conn = await self.stack.db("notifier")
        try:
            rows = await conn.fetch("SELECT id, customer_id, campaign_id, state, reason FROM messages")
        finally:
            await conn.close()
        per: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for r in rows:
            per[(r["campaign_id"], r["customer_id"])].append(r)
        received: dict[str, set[str]] = defaultdict(set)
        repeats = 0
        for body in self.stack.push.bodies():
            data = body.get("message", {}).get("data", {})
            received[f"push:{data.get('customer_id')}"].add(data.get("message_id"))
        for body in self.stack.sms.bodies():
            received[f"sms:{body.get('to')}"].add(body.get("reference"))
        repeats = len(self.stack.push.bodies()) + len(self.stack.sms.bodies()) - sum(map(len, received.values()))
        by_phone = {c["properties"]["phone"]: c["customer_id"] for c in self.load.customers}
        sent_ids: dict[tuple[str, str], set[str]] = defaultdict(set)
        for key, ids in received.items():
            channel, who = key.split(":", 1)
            cid = by_phone.get(who, who) if channel == "sms" else who
            sent_ids[(channel, cid)] |= ids
        states = Counter(r["state"] for r in rows)
        for trigger, channel in TRIGGERS.items():
            campaign = self.campaigns[trigger]
            for cid in self.load.triggered[trigger]:
                msgs = per.get((campaign, cid), [])
                self._count(f"message request ({channel})", 1, len(msgs))
                self._count(f"message final state ({channel})", 1, sum(1 for m in msgs if m["state"] in FINAL))
                self._count(f"message at provider ({channel})", 1, len(sent_ids.get((channel, cid), set())))
        untriggered = sum(
            len(v) for (camp, cid), v in per.items() if cid not in self.load.triggered.get(_trigger_of(self, camp), ())
        )
        self._count("message without a trigger", 0, untriggered)
        self.figures.notes.append(f"notifier states {dict(states)}; provider repeats of one id: {repeats}")

    async def _check_dlq(self) -> None:
        """The poison messages are in the DLQ once per consumer of the events, each with its reason;
        anything else there is an effect that was dropped."""
        dlq = await read_topic(self.stack.broker.bootstrap, TOPIC_DLQ, min_count=0, timeout=15, idle=2)
        poison = [d for d in dlq if d.get("source_topic") == TOPIC_EVENTS and d.get("message_id") is None]
        assert all(d.get("error") for d in dlq), dlq[:3]
        self._count("poison dead-lettered", len(POISON) * EVENT_CONSUMERS, len(poison))
        others = [d for d in dlq if d not in poison]
        self._count("dead-lettered (not poison)", 0, len(others))
        for d in others[:5]:
            self.figures.notes.append(f"DLQ: {d.get('consumer')} {d.get('message_id')}: {d.get('error')}")
        self.figures.notes.append(
            f"redemptions: {len(self.redeemed)} applied by the till, {len(self.refused)} refused {sorted(set(self.refused.values()))}"
        )
        self.figures.notes.append(f"DLQ records: {len(dlq)} ({len(poison)} poison, each with a reason)")


def _trigger_of(run: ChaosRun, campaign: str) -> str:
    return next((t for t, c in run.campaigns.items() if c == campaign), "")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()
