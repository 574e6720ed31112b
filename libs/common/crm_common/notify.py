"""PostgreSQL LISTEN/NOTIFY: wake this process's workers when any process commits work for them.

`NOTIFY` is transactional: a notification sent inside a transaction is delivered when it commits
and never when it rolls back, so "wake the relay" travels with the rows it announces. One
connection per process listens on every channel its workers need; while it is down (database
unreachable) the workers fall back to their timers, and after a reconnect they are all woken
once, since notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from crm_common import metrics

log = logging.getLogger(__name__)

OUTBOX_CHANNEL = "crm_outbox"


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL as a plain libpq DSN (`postgresql+asyncpg://` -> `postgresql://`)."""
    scheme, sep, rest = database_url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


class Listener:
    """One LISTEN connection calling each channel's callbacks; reconnects with backoff."""

    def __init__(self, database_url: str) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.callbacks: dict[str, list[Callable[[], None]]] = {}
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def subscribe(self, channel: str, callback: Callable[[], None]) -> None:
        self.callbacks.setdefault(channel, []).append(callback)

    def start(self) -> None:
        if self.callbacks and self._task is None:
            self._task = asyncio.create_task(self._run(), name="notify-listener")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _dispatch(self, channel: str) -> None:
        metrics.WAKEUPS.labels(channel).inc()
        for callback in self.callbacks.get(channel, ()):
            callback()

    def _wake_all(self) -> None:
        for callbacks in self.callbacks.values():
            for callback in callbacks:
                callback()

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
            except Exception as exc:
                log.warning("notify listener: database unreachable (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in self.callbacks:
                    await conn.add_listener(channel, lambda _c, _pid, ch, _payload: self._dispatch(ch))
                delay = 0.5
                self.connected.set()
                # Anything announced while we were not listening: look once.
                self._wake_all()
                await lost.wait()
                log.warning("notify listener: connection lost; reconnecting")
            except Exception as exc:
                log.warning("notify listener failed (%r); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                if not conn.is_closed():
                    conn.terminate()
