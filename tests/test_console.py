"""The ops console in headless Chromium (Debian's, driven by Playwright) over the five services.

The platform is the scenarios' (crm_common.testing.scenarios, at small scale, every service served
over HTTP) with three ops keys: the harness's (all scopes), `read` and `read+pii`. The console's
proxy forwards the key typed on its login page. Every page is loaded; the figures it shows are
compared with what the APIs answer to the same key; masking follows the key's scopes; a read-only
key's attempt to change something fails in the page. A screenshot of each page is saved under the
test's tmp_path (`pytest --basetemp DIR` to keep them somewhere known).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from crm_common.clock import ManualClock
from crm_common.console.app import ConsoleSettings, create_app
from crm_common.kafka import ensure_topics
from crm_common.pii import mask_email
from crm_common.settings import ALL_TOPICS
from crm_common.testing.generator import generate
from crm_common.testing.helpers import TEST_API_KEY, publish, serve_app, unique
from crm_common.testing.plugin import database_maker
from crm_common.testing.scenarios import World, platform

# tests/test_scenarios.py's history: its wine campaign has a control arm large enough for an interval.
SEED = 11
COUNTS = {"grocery": 60, "clothing": 10, "cleaning": 21, "loyalty": 4, "site": 9, "broadcast": 10}
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
READ_KEY, PII_KEY = "console-reader", "console-pii-reader"
KEYS = f"{TEST_API_KEY},{READ_KEY}:read,{PII_KEY}:read+pii"
CHROMIUM = "/usr/bin/chromium"
# Chromium's own background connections are refused by the closed network: switch them off.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.asyncio(loop_scope="session")


def fmt(x: Any, digits: int = 2) -> str:
    """What the console shows for a number: JavaScript's toFixed (half away from zero on the
    binary value), thousands separated; an em dash for nothing."""
    if x is None or x == "":
        return "—"
    value = Decimal(float(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{value:,.{digits}f}" if value != 0 else f"{Decimal(0):.{digits}f}"


def pct(x: Any) -> str:
    return "—" if x is None else fmt(100 * float(x), 1) + "%"


@dataclass
class Console:
    world: World
    url: str
    browser: Any

    async def api(self, key: str, service: str, path: str, method: str = "GET") -> Any:
        """What the service answers this key, asked directly (not through the console)."""
        async with httpx.AsyncClient(base_url=self.world.p.urls[service], timeout=60) as client:
            r = await client.request(method, path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (service, path, r.status_code, r.text)
        return r.json()

    async def open(self, key: str, hash_: str, shot: Path | None = None) -> Any:
        """A signed-in page showing `hash_`, fully rendered."""
        context = await self.browser.new_context(viewport={"width": 1360, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{self.url}/#/login")
        await page.fill("#key", key)
        await page.click("#sign-in")
        await page.wait_for_function("document.body.dataset.loaded === '#/campaigns'", timeout=60_000)
        await goto(page, hash_)
        assert not errors, errors
        if shot is not None:
            await page.screenshot(path=str(shot), full_page=True)
        return page


async def goto(page: Any, hash_: str) -> None:
    await page.evaluate("h => { location.hash = h }", hash_)
    await page.wait_for_function("h => document.body.dataset.loaded === h", arg=hash_, timeout=60_000)


async def cells(page: Any, table: str, k: str) -> dict[str, str]:
    """{row id: text of the row's cell named k} of a table of the page."""
    return await page.eval_on_selector_all(  # type: ignore[no-any-return]
        f"table[data-k='{table}'] tbody tr[data-row]",
        f"rows => Object.fromEntries(rows.map(r => [r.dataset.row, r.querySelector(\"[data-k='{k}']\").textContent.trim()]))",
    )


async def text(page: Any, k: str) -> str:
    return (await page.inner_text(f"[data-k='{k}']")).strip()  # type: ignore[no-any-return]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def console(pg_server, broker) -> AsyncIterator[Console]:
    from playwright.async_api import async_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium (scripts/bootstrap.sh does, as root)"
    prefix = unique("con") + "."
    await ensure_topics(broker.bootstrap, [prefix + t for t in ALL_TOPICS], partitions=3)
    clock = ManualClock(T0)
    async with (
        database_maker(pg_server) as make_database,
        platform(make_database, broker.bootstrap, prefix, clock, over_http=True, api_keys=KEYS) as p,
    ):
        world = World(p, generate(SEED, T0, COUNTS), control_share=0.3, seed=SEED)
        await world.run()
        # A size history for the segments (one point per sweep), and a message nobody can read,
        # which every consumer of crm.events.v1 dead-letters with its reason.
        for days in (0, 1):
            clock.set(T0 + timedelta(days=14 + days))
            await p.sweep("segmentation", "segments")
        await publish(broker.bootstrap, prefix + "crm.events.v1", [{"customer_id": "c-dlq", "junk": True}])
        await p.drain()
        async with serve_app(create_app(ConsoleSettings(service_urls=p.urls))) as url, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Console(world, url, browser)
            finally:
                await browser.close()


async def test_the_campaigns_page_shows_each_campaigns_state_reach_and_uplift(console, tmp_path):
    page = await console.open(READ_KEY, "#/campaigns", tmp_path / "campaigns.png")
    campaigns = (await console.api(READ_KEY, "offers", "/v1/campaigns?limit=200"))["items"]
    assert len(campaigns) == len(console.world.campaign_ids) >= 5
    states = await cells(page, "campaigns", "state")
    reach = await cells(page, "campaigns", "reach")
    uplift = await cells(page, "campaigns", "uplift")
    assert set(states) == {c["id"] for c in campaigns}
    for c in campaigns:
        report = await console.api(READ_KEY, "offers", f"/v1/campaigns/{c['id']}/report")
        assert states[c["id"]] == c["state"]
        assert reach[c["id"]] == fmt(report["arms"]["treated"]["members"], 0)
        incremental = report["incremental_revenue"]
        assert uplift[c["id"]] == fmt(incremental and incremental["estimate"])
    assert any(v != "—" for v in uplift.values()), "no campaign showed an uplift: nothing was compared"


async def test_a_campaign_page_shows_its_report_outcomes_dry_run_and_state_change_by_scope(console, tmp_path):
    cid = console.world.campaign_ids["wine"]
    page = await console.open(READ_KEY, f"#/campaigns/{cid}", tmp_path / "campaign.png")
    report = await console.api(READ_KEY, "offers", f"/v1/campaigns/{cid}/report")
    arms = report["arms"]
    assert await text(page, "treated-members") == fmt(arms["treated"]["members"], 0)
    assert await text(page, "control-members") == fmt(arms["control"]["members"], 0)
    incremental = report["incremental_revenue"]
    assert await text(page, "incremental") == fmt(incremental["estimate"])
    assert await text(page, "incremental-interval") == f"95% [{fmt(incremental['low'])}, {fmt(incremental['high'])}]"
    assert await text(page, "cost") == fmt(report["cost"]["total"])
    assert await text(page, "roi") == (fmt(report["roi"]["estimate"]) if report["roi"] else "—")
    series = report["series"]
    assert series
    shown = await cells(page, "series", "treated")
    assert list(shown.values()) == [pct(d["conversion_rate"]["treated"]) for d in series]
    points = await page.eval_on_selector_all(
        "[data-k='conversion-chart'] circle[data-series='treated']", "c => c.length"
    )
    assert points == sum(d["conversion_rate"]["treated"] is not None for d in series)
    outcomes = await console.api(READ_KEY, "offers", f"/v1/campaigns/{cid}/outcomes")
    assert await cells(page, "outcomes", "count") == {o: fmt(n, 0) for o, n in outcomes.items()}
    assert "requested" in outcomes and "control" in outcomes
    # A read-only key may not pause the campaign: the page shows the API's 403 and the state is unchanged.
    assert await page.inner_text("#state-change") == "Pause"
    await page.click("#state-change")
    await page.wait_for_selector("#state-result [data-k='error']")
    assert "403 missing_scope" in await page.inner_text("#state-result")
    assert (await console.api(READ_KEY, "offers", f"/v1/campaigns/{cid}"))["state"] == "active"
    # It may run the dry-run: a POST that changes nothing (x-changes-nothing).
    await page.click("#dry-run")
    await page.wait_for_selector("[data-k='dry-reached']")
    read_dry = await console.api(READ_KEY, "offers", f"/v1/campaigns/{cid}/dry-run", method="POST")
    assert await text(page, "dry-evaluated") == fmt(read_dry["evaluated"], 0)
    # The why of one control member.
    control = next(c for c, arm, _ in await console.world.assignments("wine") if arm == "control")
    await page.fill("#why-customer", control)
    await page.click("#why-submit")
    await page.wait_for_selector("[data-k='why-sentence']")
    why = await console.api(READ_KEY, "offers", f"/v1/campaigns/{cid}/why/{control}")
    assert await text(page, "why-sentence") == why["sentence"]

    # The full key runs it, and the page shows what the API answers for the same state.
    full = await console.open(TEST_API_KEY, f"#/campaigns/{cid}")
    await full.click("#dry-run")
    await full.wait_for_selector("[data-k='dry-reached']")
    dry = await console.api(TEST_API_KEY, "offers", f"/v1/campaigns/{cid}/dry-run", method="POST")
    assert await text(full, "dry-evaluated") == fmt(dry["evaluated"], 0)
    assert await text(full, "dry-reached") == fmt(dry["reached"], 0)
    assert await text(full, "dry-cost") == fmt(dry["expected_cost"])
    assert await cells(full, "dry-outcomes", "count") == {o: fmt(n, 0) for o, n in dry["outcomes"].items()}
    await full.screenshot(path=str(tmp_path / "campaign-dry-run.png"), full_page=True)
    # The full key pauses it from the page, and resumes it (the other tests read it active).
    await full.click("#state-change")
    await full.wait_for_function("document.querySelector('#state-change')?.innerText === 'Resume'")
    assert (await console.api(TEST_API_KEY, "offers", f"/v1/campaigns/{cid}"))["state"] == "paused"
    await full.click("#state-change")
    await full.wait_for_function("document.querySelector('#state-change')?.innerText === 'Pause'")
    assert (await console.api(TEST_API_KEY, "offers", f"/v1/campaigns/{cid}"))["state"] == "active"


async def test_the_segments_pages_show_sizes_over_time_and_the_rule(console, tmp_path):
    page = await console.open(READ_KEY, "#/segments", tmp_path / "segments.png")
    segments = await console.api(READ_KEY, "segmentation", "/v1/segments")
    assert await cells(page, "segments", "size") == {s["key"]: fmt(s["size"], 0) for s in segments}
    wine = next(s for s in segments if s["key"] == "friday_wine_lovers")
    await goto(page, f"#/segments/{wine['key']}")
    await page.screenshot(path=str(tmp_path / "segment.png"), full_page=True)
    sizes = await console.api(READ_KEY, "segmentation", f"/v1/segments/{wine['key']}/sizes")
    assert len(sizes) >= 2
    shown = await page.eval_on_selector_all(
        "table[data-k='sizes'] tbody tr [data-k='size']", "c => c.map(x => x.innerText.trim())"
    )
    assert shown == [fmt(p["size"], 0) for p in sizes]
    assert await text(page, "size") == fmt(wine["size"], 0)
    rule = await text(page, "rule")
    assert "wine" in rule and "friday" in rule.lower() and "{" not in rule, rule


async def test_the_reports_page_shows_pareto_rfm_liability_and_channel_cost(console, tmp_path):
    page = await console.open(READ_KEY, "#/reports", tmp_path / "reports.png")
    pareto = await console.api(READ_KEY, "segmentation", "/v1/reports/pareto")
    assert await cells(page, "pareto", "share") == {str(s["top_percent"]): pct(s["share"]) for s in pareto["shares"]}
    assert await cells(page, "pareto", "revenue") == {
        str(s["top_percent"]): fmt(s["revenue"]) for s in pareto["shares"]
    }
    rfm = await console.api(READ_KEY, "segmentation", "/v1/reports/rfm")
    assert rfm["cells"], "the RFM sweep scored nobody"
    grid = await page.eval_on_selector_all(
        "table[data-k='rfm-grid'] td[data-cell]",
        "c => Object.fromEntries(c.map(x => [x.dataset.cell, x.innerText.trim()]))",
    )
    expected = {f"{r}-{f}": "" for r in range(1, 6) for f in range(1, 6)}
    expected.update({f"{c['r']}-{c['f']}": fmt(c["customers"], 0) for c in rfm["cells"]})
    assert grid == expected
    assert await cells(page, "rfm-groups", "customers") == {g["group"]: fmt(g["customers"], 0) for g in rfm["groups"]}
    points = await console.api(READ_KEY, "loyalty", "/v1/reports/points")
    assert points["months"]
    months = {m["month"][:7]: m for m in points["months"]}
    assert await cells(page, "liability", "liability-money") == {
        k: fmt(m["liability_money"]) for k, m in months.items()
    }
    assert await cells(page, "liability", "issued") == {k: fmt(m["issued"]) for k, m in months.items()}
    channels = await console.api(READ_KEY, "notifier", "/v1/reports/channels")
    assert channels["rows"] and Decimal(channels["by_channel"]["sms"]) > 0
    assert await cells(page, "channels", "cost") == {
        f"{r['month']}/{r['channel']}": fmt(r["cost"]) for r in channels["rows"]
    }
    assert await text(page, "channel-total") == fmt(channels["total"])
    assert await text(page, "channel-sms") == fmt(channels["by_channel"]["sms"])


async def test_the_customer_page_shows_everything_about_one_customer_masked_by_scope(console, tmp_path):
    world = console.world
    # A wine lover: a profile, an e-mail address, a coupon, a message and the campaign's decision.
    cid = next(c for c, arm, _ in sorted(await world.assignments("wine")) if arm == "treated")
    contact = await console.api(PII_KEY, "notifier", f"/v1/customers/{cid}/contact")
    assert contact["email"] and "@" in contact["email"]
    page = await console.open(READ_KEY, f"#/customers/{cid}", tmp_path / "customer-masked.png")
    masked = (await console.api(READ_KEY, "notifier", f"/v1/customers/{cid}/contact"))["email"]
    assert masked == mask_email(contact["email"]) != contact["email"]
    assert await text(page, "email") == masked
    assert contact["email"] not in await page.inner_text("body")
    whole = await console.open(PII_KEY, f"#/customers/{cid}", tmp_path / "customer.png")
    assert await text(whole, "email") == contact["email"]

    profile = await console.api(READ_KEY, "segmentation", f"/v1/profiles/{cid}")
    assert await text(page, "orders") == fmt(profile["orders"], 0)
    assert await text(page, "lifecycle") == profile["lifecycle"]
    segs = await page.eval_on_selector_all(
        "table[data-k='customer-segments'] tbody tr[data-row]", "r => r.map(x => x.dataset.row)"
    )
    assert segs == [s["key"] for s in profile["segments"]] and "friday_wine_lovers" in segs
    decisions = await console.api(READ_KEY, "offers", f"/v1/customers/{cid}/decisions")
    assert decisions
    assert list((await cells(page, "decisions", "why")).values()) == [d["explanation"] for d in decisions]
    assert list((await cells(page, "decisions", "outcome")).values()) == [d["outcome"] for d in decisions]
    coupons = await console.api(READ_KEY, "offers", f"/v1/customers/{cid}/coupons")
    assert coupons and set(await cells(page, "coupons", "code")) == {c["code"] for c in coupons}
    messages = (await console.api(READ_KEY, "notifier", f"/v1/customers/{cid}/messages"))["items"]
    assert messages and set(await cells(page, "messages", "channel")) == {m["id"] for m in messages}

    # A loyalty member's ledger.
    member = sorted(world.history.truth.loyalty_paid)[0]
    await goto(page, f"#/customers/{member}")
    ledger = await console.api(READ_KEY, "loyalty", f"/v1/accounts/{member}/ledger")
    assert ledger["entries"]
    assert await cells(page, "ledger", "balance") == {str(e["seq"]): fmt(e["balance_after"]) for e in ledger["entries"]}
    account = await console.api(READ_KEY, "loyalty", f"/v1/accounts/{member}")
    assert await text(page, "balance") == fmt(account["balance"])
    await page.screenshot(path=str(tmp_path / "customer-ledger.png"), full_page=True)


async def test_the_operations_page_shows_lag_outboxes_breakers_and_the_dlq_with_reasons(console, tmp_path):
    page = await console.open(READ_KEY, "#/operations", tmp_path / "operations.png")
    services = ("ingest", "segmentation", "loyalty", "offers", "notifier")
    for service in services:
        pipeline = await console.api(READ_KEY, service, "/v1/ops/pipeline")
        assert await text(page, f"outbox-{service}") == fmt(pipeline["outbox_backlog"], 0)
    consumers = await cells(page, "consumers", "lag")
    seg_pipeline = await console.api(READ_KEY, "segmentation", "/v1/ops/pipeline")
    for c in seg_pipeline["consumers"]:
        assert consumers[f"segmentation/{c['name']}"] == fmt(c["lag"], 0)
    providers = await console.api(READ_KEY, "notifier", "/v1/providers")
    assert await cells(page, "providers", "breaker") == {p["name"]: p["breaker"] for p in providers}
    reasons = await cells(page, "dlq", "reason")
    expected: dict[str, str] = {}
    for service in services:
        for entry in (await console.api(READ_KEY, service, "/v1/ops/dlq"))["items"]:
            expected[entry["id"]] = entry["error"]
    assert len(expected) >= 3, "the unreadable event was dead-lettered by fewer consumers than expected"
    assert reasons == expected
    assert all(re.search(r"\w", r) for r in reasons.values())


async def test_the_proxy_forwards_only_v1_routes_of_known_services(console):
    async with httpx.AsyncClient(base_url=console.url) as client:
        assert (await client.get("/api/nowhere/v1/x")).json()["error"]["code"] == "unknown_service"
        assert (await client.get("/api/offers/metrics")).status_code == 404
        r = await client.get("/api/offers/v1/campaigns")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await client.post("/api/offers/v1/ops/sweeps/triggers", headers={"Authorization": f"Bearer {READ_KEY}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "missing_scope"
        index = await client.get("/")
        assert index.status_code == 200 and "/static/console.js" in index.text
