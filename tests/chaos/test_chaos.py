"""The whole pipeline under crashes and outages: nothing lost, nothing doubled.

The short run is part of `make test` (a few thousand events, every kind of fault once, two kills);
the long one (`make test-chaos`: >= 50,000 events, more kills, longer outages) runs only when
CRM_CHAOS=long. CRM_CHAOS_SEED fixes the seed (printed either way), so a failure can be replayed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from .load import generate
from .run import ChaosRun, Plan
from .stack import SERVICES, ChaosStack, say

LONG = os.environ.get("CRM_CHAOS") == "long"

SHORT = Plan(kills=2, broker_pause_s=(10, 12), db_refusal_s=(4, 6), provider_s=(5, 8), gap_s=(1, 3))
FULL = Plan(kills=8, broker_pause_s=(10, 30), db_refusal_s=(8, 20), provider_s=(10, 20), gap_s=(3, 10))


def _seed(default: int) -> int:
    return int(os.environ.get("CRM_CHAOS_SEED") or default)


async def _chaos(seed: int, events: int, plan: Plan, timeout: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="crm-chaos-"))
    os.chmod(tmp, 0o755)
    say(f"seed {seed} (CRM_CHAOS_SEED={seed} replays it); {events} events; work dir {tmp}")
    started = time.monotonic()
    stack = ChaosStack(tmp)
    failed = True
    try:
        await stack.start()
        run = ChaosRun(stack, generate(seed, events), plan)
        figures = await run.run(drain_timeout=timeout)
        print(figures.report(seed, time.monotonic() - started), flush=True)
        assert sum(figures.lost.values()) == 0, figures.lost
        assert sum(figures.doubled.values()) == 0, figures.doubled
        failed = False
    finally:
        if failed:
            for s in SERVICES:
                print(f"--- {s} log tail ---\n{stack.log_tail(s, 2000)}", flush=True)
        await stack.stop()
        if not failed and not os.environ.get("CRM_TEST_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(400)
async def test_short_chaos_loses_and_doubles_nothing():
    await _chaos(_seed(1), 3_000, SHORT, timeout=240)


@pytest.mark.skipif(not LONG, reason="the long chaos run: make test-chaos (CRM_CHAOS=long)")
@pytest.mark.timeout(3600)
async def test_long_chaos_loses_and_doubles_nothing():
    await _chaos(_seed(int(time.time()) % 100_000), int(os.environ.get("CRM_CHAOS_EVENTS", "50000")), FULL, timeout=900)
