"""Background work of a service: one loop shape for relays, the dispatcher and periodic sweeps.

A `Worker` repeats its `run_once` while it finds work, then sleeps until it is woken (right after
a commit that wrote work for it, in this process or, through PostgreSQL NOTIFY, in another one)
or until its fallback timer runs out. A failing pass backs off (capped, jittered) and the worker
carries on; it never dies of an error. Stopping lets the pass in flight finish; a worker that
drains on stop (a relay) keeps going until a pass finds nothing, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from crm_common import metrics
from crm_common.errors import is_transient

log = logging.getLogger(__name__)

RunOnce = Callable[[], Awaitable[int]]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Worker:
    """Run `run_once` (returns how much it did) on wake-ups, with a timer only as a fallback."""

    def __init__(
        self,
        name: str,
        run_once: RunOnce,
        *,
        interval_s: float,
        channels: Sequence[str] = (),
        full_batch: int | None = None,
        run_at_start: bool = True,
        drain_on_stop: bool = False,
        stop_timeout_s: float = 30,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        coalesce_s: float = 0.0,
    ) -> None:
        """`full_batch`: a pass that did at least this much runs again at once (there is likely
        more); without it, any pass that did something runs again. `channels`: NOTIFY channels
        that wake this worker. `run_at_start`: False waits one interval first (a sweep).
        `coalesce_s`: after a wake-up, wait this long before the pass, so that a burst of
        commits (say 300 redemptions a second, each waking the relay) is handled by one pass
        instead of one pass per commit."""
        self.name = name
        self.run_once = run_once
        self.interval_s = interval_s
        self.channels = tuple(channels)
        self.full_batch = full_batch
        self.run_at_start = run_at_start
        self.drain_on_stop = drain_on_stop
        self.stop_timeout_s = stop_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.coalesce_s = coalesce_s
        self.passes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Ask for a pass now instead of at the fallback timer; from any thread (a worker may run
        on a loop of its own, as the relays do: crm_common.relay_thread)."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._wake.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._stopping.clear()
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(), name=f"worker:{self.name}")

    async def stop(self) -> None:
        """Let the pass in flight finish (and drain, if asked), bounded; then stop."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.stop_timeout_s)
        except TimeoutError:
            log.warning("worker %s did not stop within %.0f s; cancelled", self.name, self.stop_timeout_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _backoff(self, streak: int) -> float:
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(streak, 10))
        return base * (0.5 + random.random() / 2)

    async def _sleep(self, seconds: float) -> None:
        """Wait for a wake-up or `seconds`, whichever comes first."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            return
        if self.coalesce_s > 0 and not self._stopping.is_set():
            await asyncio.sleep(self.coalesce_s)

    async def _run(self) -> None:
        streak = 0
        if not self.run_at_start:
            await self._sleep(self.interval_s)
        while True:
            if self._stopping.is_set() and not self.drain_on_stop:
                return
            self._wake.clear()
            started = time.perf_counter()
            try:
                done = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                streak += 1
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                metrics.WORKER_PASSES.labels(self.name, "failed").inc()
                delay = self._backoff(streak)
                if is_transient(exc):
                    log.warning("worker %s: dependency unavailable (%r); retrying in %.2f s", self.name, exc, delay)
                else:
                    log.exception("worker %s: pass failed; retrying in %.2f s", self.name, delay)
                if self._stopping.is_set() and streak > 3:
                    return
                await asyncio.sleep(delay)
                continue
            streak = 0
            self.passes += 1
            metrics.WORKER_PASSES.labels(self.name, "ok").inc()
            metrics.WORKER_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            if done:
                metrics.WORKER_ITEMS.labels(self.name).inc(done)
            more = done >= self.full_batch if self.full_batch is not None else done > 0
            if self._stopping.is_set():
                if not self.drain_on_stop or done == 0:
                    return
                continue
            if more:
                continue
            await self._sleep(self.interval_s)
