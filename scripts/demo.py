"""`make demo`: the seven reference scenarios (SCENARIOS.md) end to end, with a readable report.

A generated history (crm_common.testing.generator: deterministic by `--seed`, `--scale` a fraction
of SCENARIOS.md's default sizes) is posted through ingest in batches of 500; the scenarios'
templates, segment, loyalty programme and campaigns are configured through the ops APIs; a
simulated clock moves over two weeks while the sweeps run (crm_common.testing.scenarios.World);
e-mail goes to a local SMTP server, SMS and push to loopback HTTP providers. Then it prints, per
scenario, what the APIs answer: segment sizes, decisions, messages per channel and state, treated
vs control conversion, incremental revenue with its 95% interval beside the planted uplift, cost
and ROI, loyalty liability, the Pareto share.

The simulated clock is the services' injectable clock (`create_app(clock=...)`), which only an
in-process stack can share: the demo starts its own PostgreSQL and broker on free ports (a
temporary directory, removed at the end) and runs the five services in this process. A platform
started with `make run` reads the wall clock, so the demo does not drive it (it would have to wait
days of real time); it keeps running beside it undisturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from crm_common.clock import ManualClock
from crm_common.console.app import CONSOLE_PORT, ConsoleSettings
from crm_common.console.app import create_app as create_console
from crm_common.infra import BrokerServer, PostgresServer, free_port, port_open
from crm_common.kafka import ensure_topics
from crm_common.migrations import upgrade_async
from crm_common.settings import ALL_TOPICS, SERVICE_PORTS
from crm_common.testing.generator import DEFAULT_COUNTS, generate, scaled
from crm_common.testing.helpers import TEST_API_KEY, serve_app
from crm_common.testing.scenarios import POS_KEY, World, platform


def say(msg: str = "") -> None:
    print(msg, flush=True)


def table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> None:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return indent + "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )

    say(line(cells[0]))
    say(indent + "  ".join("-" * w for w in widths))
    for r in cells[1:]:
        say(line(r))


def num(v: Any, places: int = 2) -> str:
    if v is None:
        return "-"
    return f"{float(v):,.{places}f}"


def pct(v: Any) -> str:
    return "-" if v is None else f"{float(v) * 100:.1f}%"


def interval(iv: dict[str, Any] | None) -> str:
    if not iv:
        return "no interval (an arm has fewer than two members)"
    return f"{num(iv['estimate'])}  [{num(iv['low'])}, {num(iv['high'])}]"


async def channels_of(w: World, campaign: str) -> Counter[tuple[str, str]]:
    """(channel, state) of the campaign's messages, as the notifier counts them."""
    doc = await w.p.get("notifier", f"/v1/campaigns/{w.campaign_ids[campaign]}/messages")
    out: Counter[tuple[str, str]] = Counter()
    for c in doc["counts"]:
        out[(c["channel"], c["state"] + (f" ({c['reason']})" if c["reason"] else ""))] += c["messages"]
    return out


async def campaign_block(w: World, name: str, truth_line: str | None = None) -> None:
    cid = w.campaign_ids[name]
    if truth_line is None and name in w.uplift:
        truth_line = planted(w, name)
    outcomes = await w.p.get("offers", f"/v1/campaigns/{cid}/outcomes")
    counts = outcomes.get("outcomes", outcomes) if isinstance(outcomes, dict) else outcomes
    rows = sorted(counts.items()) if isinstance(counts, dict) else [[o["outcome"], o["count"]] for o in counts]
    say(f"  campaign '{w.reports[name]['name']}' ({cid}): decisions by outcome")
    table(["outcome", "decisions"], [list(r) for r in rows], indent="    ")
    msgs = await channels_of(w, name)
    if msgs:
        say("  messages by channel and state (notifier)")
        table(["channel", "state", "messages"], [[c, s, n] for (c, s), n in sorted(msgs.items())], indent="    ")
    r = w.reports[name]
    arms = r["arms"]
    say("  report (GET /v1/campaigns/{id}/report?cap_percentile=100)")
    table(
        ["arm", "members", "converted", "conversion", "revenue", "per member"],
        [
            [
                arm,
                a["members"],
                a["converted"],
                pct(a["conversion_rate"]),
                num(a["revenue"]),
                num(a["revenue_per_member"]),
            ]
            for arm, a in arms.items()
        ],
        indent="    ",
    )
    cost = r["cost"]
    rows2 = [
        ["incremental revenue, 95% interval", interval(r["incremental_revenue"])],
        ["conversion difference", interval(r["conversion_rate_difference"])],
    ]
    if truth_line:
        rows2.append(["planted uplift (generator's truth)", truth_line])
    rows2 += [
        [
            "cost: discounts + channel + points",
            f"{num(cost['discounts'])} + {num(cost['channel'])} + {num(cost['points_value'])} = {num(cost['total'])}",
        ],
        ["incremental margin", interval(r["incremental_margin"]) if r["incremental_margin"] else "-"],
        [
            "ROI",
            "- (nothing spent)"
            if r["roi"] is None
            else interval(r["roi"])
            if isinstance(r["roi"], dict)
            else num(r["roi"]),
        ],
    ]
    table(["figure", "value"], rows2, indent="    ")
    for warning in r["warnings"]:
        say(f"    warning: {warning}")


def planted(w: World, name: str) -> str:
    u = w.uplift[name]
    iv = w.reports[name]["incremental_revenue"]
    inside = (
        "no interval"
        if not iv
        else "inside the interval"
        if iv["low"] <= u.expected_incremental_revenue <= iv["high"]
        else "OUTSIDE the interval (see the warnings: too few control members at this scale)"
    )
    return (
        f"{num(u.expected_incremental_revenue)} expected ({u.treated} treated x 30% x "
        f"{num(u.expected_incremental_revenue / max(1, u.treated) / Decimal('0.3'))}), "
        f"{num(u.incremental_revenue)} drawn; {inside}"
    )


async def report(w: World, elapsed: float) -> None:
    p, truth = w.p, w.history.truth
    segs = {s["key"]: s for s in await p.get("segmentation", "/v1/segments")}
    say("")
    say("== scenario 1 (grocery): Friday wine lovers, a personal offer on their own wine")
    table(
        ["", "count"],
        [
            ["segment friday_wine_lovers now (API)", segs["friday_wine_lovers"]["size"]],
            ["wine lovers the generator planted", len(truth.wine_lovers)],
            ["near misses (two Fridays) planted, must stay out", len(truth.wine_near_misses)],
        ],
    )
    await campaign_block(w, "wine", planted(w, "wine"))

    say("")
    say("== scenario 2 (clothing): retention 7-14 days before the predicted purchase")
    table(["", "count"], [["clothing customers", len(w.history.of("clothing"))]])
    await campaign_block(w, "retention")

    say("")
    say("== scenario 3 (cleaning): win back lapsed regulars")
    kinds = Counter(truth.lapsed.values())
    table(
        ["", "count"],
        [
            ["segment lapsed_regulars now (API)", segs["lapsed_regulars"]["size"]],
            ["lapsed regulars planted: low quality rating", kinds["recovery"]],
            ["lapsed regulars planted: others", kinds["discount"]],
            ["still active regulars planted, must stay out", len(truth.still_active)],
        ],
    )
    await campaign_block(w, "recovery")
    await campaign_block(w, "winback", planted(w, "winback"))

    say("")
    say("== scenario 4 (loyalty): 1% accrual (3% from 300), expiry after 180 days, reminder 14 days before; goals")
    points = await p.get("loyalty", "/v1/reports/points")
    table(
        ["", "value"],
        [
            ["expiry reminders on day 1 (sweep)", w.expiry_reminders],
            ["the same sweep again", w.expiry_reminders_again],
            *(
                [
                    [
                        f"POS redemption on a 1.00 check ({w.redemptions[0]['customer_id']})",
                        f"{w.redemptions[0]['points_applied']} points = {w.redemptions[0]['money_applied']} "
                        f"(30% cap); retry answered the same: {w.redemptions[1] == w.redemptions[0]}",
                    ]
                ]
                if w.redemptions
                else []
            ),
            *(
                [
                    [
                        f"refund of a 20.00 check paid partly with points ({w.refund_check['customer_id']})",
                        f"{w.refund_check['redemption']['points_applied']} points redeemed; balance "
                        f"{num(w.refund_check['before'])} -> {num(w.refund_check['after_purchase'])} after the "
                        f"purchase -> {num(w.refund_check['after_refund'])} after the refund",
                    ]
                ]
                if w.refund_check
                else []
            ),
            *[[f"expiry sweep on day 14: {k}", v] for k, v in w.expired.items()],
        ],
    )
    goal_status: Counter[str] = Counter()
    goal_points = Decimal(0)
    goal_offers: Counter[str] = Counter()
    for cid in truth.goals:
        for g in (await p.get("loyalty", f"/v1/accounts/{cid}"))["goals"]:
            goal_status[f"{g['status']} (progress {g['progress']} of {g['target']})"] += 1
        ledger = await p.get("loyalty", f"/v1/accounts/{cid}/ledger")
        goal_points += sum((Decimal(e["points"]) for e in ledger["entries"] if e["kind"] == "goal_bonus"), Decimal(0))
        for m in (await p.get("notifier", f"/v1/customers/{cid}/messages"))["items"]:
            if m["template"] == "loyalty_goal_offer":
                goal_offers[f"{m['channel']} {m['state']}"] += 1
    planned = Counter(truth.goals.values())
    say("  personal goal: '3 purchases in the next 30 days' for 300 points, on entering visits_dropped")
    table(
        ["", "customers"],
        [
            ["weekly regulars whose visits stopped (planted)", len(truth.goals)],
            ["of them buying 3 times / once after the offer (planted)", f"{planned['met']} / {planned['unmet']}"],
            *[[f"goal offer messages: {k} (notifier)", v] for k, v in sorted(goal_offers.items())],
            *[[f"goals {k} (loyalty)", v] for k, v in sorted(goal_status.items())],
            ["goal bonus points booked (ledgers)", num(goal_points)],
        ],
        indent="    ",
    )
    months = points.get("months") or points.get("by_month") or []
    if months:
        keys = [k for k in months[0] if k != "month"][:6]
        table(["month", *keys], [[m.get("month"), *[m.get(k) for k in keys]] for m in months[-6:]])
    for k, v in points.items():
        if not isinstance(v, (list, dict)):
            say(f"  {k}: {v}")

    say("")
    say("== scenario 5 (value tiers): Pareto, tiers, the economics guard")
    pareto = await p.get("segmentation", "/v1/reports/pareto")
    revenue = dict(truth.revenue)
    for up in w.uplift.values():
        for e in up.events:
            revenue[e["customer_id"]] = revenue.get(e["customer_id"], Decimal(0)) + Decimal(e["properties"]["total"])
    values = sorted(revenue.values(), reverse=True)
    total = sum(values, Decimal(0))

    def truth_share(top: int) -> str:
        k = -(-len(values) * top // 100)
        return pct(sum(values[:k], Decimal(0)) / total) if total else "-"

    say(
        f"  {pareto['customers']:,} purchasing customers, revenue {num(pareto['revenue'])} (generator: "
        f"{len(values):,}, {num(total)})"
    )
    table(
        ["top customers", "revenue", "share (API)", "share (generator)"],
        [
            [f"top {s['top_percent']}%", num(s["revenue"]), pct(s["share"]), truth_share(s["top_percent"])]
            for s in pareto["shares"]
        ],
    )
    table(
        ["tier segment", "members (API)"],
        [[k, segs[k]["size"]] for k in ("core", "middle", "unprofitable") if k in segs]
        + [["deal hunters planted (unprofitable)", len(truth.deal_hunters)]],
    )
    dr = w.dry_run
    say("  dry-run of '10% for everyone' (POST /v1/campaigns/dry-run), the default guard on")
    table(["outcome", "customers"], sorted(dr["outcomes"].items()), indent="    ")
    say(
        f"    evaluated {dr['evaluated']}, reached {dr['reached']}, discount cost {num(dr['discount_cost'])}, "
        f"channel cost {num(dr['channel_cost'])}, expected cost {num(dr['expected_cost'])}"
    )

    say("")
    say("== scenario 6 (site): abandoned cart and browsing, a reminder after 24 hours without a purchase; referral")
    carts = Counter(truth.carts.values())
    table(
        ["", "count"],
        [
            ["carts left", carts["abandoned"]],
            ["carts bought within the wait", carts["bought"]],
            ["anonymous browsers linked later", len(truth.anonymous_links)],
            ["timers sweep on day 1", str(w.timers_fired)],
        ],
    )
    await campaign_block(w, "cart")
    browses = Counter(truth.browses.values())
    say("  browse without purchase: two bags viewed, no purchase within 24 hours")
    table(
        ["", "count"],
        [["bag browsers who bought nothing", browses["abandoned"]], ["bag browsers who bought", browses["bought"]]],
        indent="    ",
    )
    await campaign_block(w, "browse")
    referred = {"linked (loyalty: referred_by)": 0, "bought (loyalty: purchases)": 0, "never bought": 0}
    bonus = {"referrers": Decimal(0), "new customers": Decimal(0)}
    for new, referrer in truth.referrals.items():
        acct = await p.get("loyalty", f"/v1/accounts/{new}")
        referred["linked (loyalty: referred_by)"] += acct["referred_by"] == referrer
        for who, cid in (("new customers", new), ("referrers", referrer)):
            ledger = await p.get("loyalty", f"/v1/accounts/{cid}/ledger")
            bonus[who] += sum(
                (Decimal(e["points"]) for e in ledger["entries"] if e["kind"] == "referral_bonus"), Decimal(0)
            )
        if acct["purchases_count"]:
            referred["bought (loyalty: purchases)"] += 1
        else:
            referred["never bought"] += 1
    say("  referral: new customers signing up with a referrer's code (200 points to the referrer, 100 to them)")
    table(
        ["", "value"],
        [
            ["new customers with a code (planted)", len(truth.referrals)],
            *[[k, v] for k, v in referred.items()],
            *[[f"referral bonus points of the {k} (ledgers)", num(v)] for k, v in bonus.items()],
        ],
        indent="    ",
    )

    say("")
    say("== scenario 7 (mass): New Year sale at 10:00 local, four days running; cap 3 marketing messages in 7 days")
    zones = Counter(w.history.customers[c].timezone for c in truth.broadcast)
    table(["time zone", "customers"], sorted(zones.items()))
    await campaign_block(w, "broadcast")
    say("")
    say(
        f"demo finished in {elapsed:.0f} s (seed {w.seed}, {len(w.history.events):,} events, "
        f"{len(w.history.customers):,} customers)"
    )


async def stay(p: Any) -> None:
    """Keep the filled platform up for browsing until Ctrl-C: every service on a loopback port."""
    async with AsyncExitStack() as stack:
        urls = dict(p.urls)
        for name, app in p.apps.items():
            if name not in urls:
                port = SERVICE_PORTS[name] if not port_open("127.0.0.1", SERVICE_PORTS[name]) else None
                urls[name] = await stack.enter_async_context(serve_app(app, port, lifespan=False))
        console = create_console(ConsoleSettings(service_urls=urls))
        port = CONSOLE_PORT if not port_open("127.0.0.1", CONSOLE_PORT) else None
        console_url = await stack.enter_async_context(serve_app(console, port))
        say("")
        say("== the demo's platform stays up, filled, until Ctrl-C (its clock stays at the demo's last day):")
        say(f"  console       {console_url}   (sign in with the ops key below)")
        for name in SERVICE_PORTS:
            say(f"  {name:<13} {urls[name]}   docs: {urls[name]}/docs")
        say(f"  ops key of segmentation, loyalty, offers, notifier: Bearer {TEST_API_KEY}; ingest: Bearer {POS_KEY}")
        say(f"  try: curl -s -H 'Authorization: Bearer {TEST_API_KEY}' {urls['offers']}/v1/campaigns")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        say("stopping the demo's platform")


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="crm-demo-"))
    os.chmod(tmp, 0o755)  # PostgreSQL runs as the `postgres` user when the demo runs as root
    pg = PostgresServer(tmp / "pg", free_port(), durable=False)
    broker = BrokerServer(free_port(), log_path=tmp / "broker.log")
    say("== starting PostgreSQL and the broker for the demo (free ports, temporary directory)")
    pg.start()
    broker.start()
    try:

        async def make_database(package: str) -> str:
            admin = await asyncpg.connect(pg.admin_url)
            try:
                await admin.execute(f'CREATE DATABASE "{package}"')
            finally:
                await admin.close()
            await upgrade_async(package, pg.url(package))
            return pg.url(package)

        prefix = "demo."
        await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=3)
        t0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday; the clock starts here
        counts = scaled(args.scale)
        say(f"== generating the history (seed {args.seed}, scale {args.scale})")
        history = generate(args.seed, t0, counts)
        table(["business", "customers"], [[k, v] for k, v in counts.items()])
        say(f"  {len(history.events):,} events, fingerprint {history.fingerprint()[:16]}")
        clock = ManualClock(t0)
        started = time.monotonic()
        async with platform(make_database, broker.bootstrap, prefix, clock) as p:
            w = World(p, history, control_share=args.control_share, seed=args.seed, log=lambda m: say(f"  {m}"))
            say("== running the scenarios on a simulated clock from " + t0.isoformat())
            await w.run()
            say(f"  simulated clock now {clock.now().isoformat()} ({(clock.now() - t0) / timedelta(days=1):.0f} days)")
            say(
                f"  e-mails received by the SMTP server: {len(p.mailbox.messages)}, SMS by the provider: "
                f"{len(p.sms.received)}, push: {len(p.push.received)}"
            )
            await report(w, time.monotonic() - started)
            if args.stay:
                await stay(p)
    finally:
        broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--scale",
        type=float,
        default=0.003,
        help=f"fraction of SCENARIOS.md's sizes {DEFAULT_COUNTS} (default 0.003: about 450 customers)",
    )
    parser.add_argument("--control-share", type=float, default=0.1)
    parser.add_argument(
        "--stay",
        action=argparse.BooleanOptionalAction,
        default=sys.stdin.isatty(),
        help="after the report, keep the filled platform up for browsing until Ctrl-C "
        "(default: when run from a terminal)",
    )
    args = parser.parse_args()
    # The ops APIs of the in-process services take this key (the scenarios' clients send it).
    os.environ["CRM_API_KEYS"] = TEST_API_KEY
    # The services' request and lifecycle logs would bury the report; warnings and errors still show.
    os.environ.setdefault("CRM_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # FastAPI's notice about ORJSONResponse (a UserWarning subclass), once per route: not for a marketer.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
