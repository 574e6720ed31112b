"""Recovery from a broker that lost its data (the embedded Tansu keeps topics in memory).

A broker that comes back empty has lost every message in flight: what the relays had sent but
the consumers had not applied yet, and the consumer groups' committed offsets. The platform
still holds all of it: ingest's archive (`POST /v1/replay`) and every other service's outbox,
which keeps sent rows for `outbox_retention_s` (`POST /v1/ops/republish`).

`BrokerRecovery` is driven by whoever supervises the broker (`make run`'s devstack, the chaos
stack): `observe()` while the broker is up records the log end offset of every partition of the
platform's topics; after the broker process (re)started, `after_restart()` first DETECTS a loss
(a platform topic is missing, or a partition ends below what was recorded) and only then
recovers:

1. recreate the topics (`ensure_topics`);
2. restart the services (the caller's `restart_services`, a kill -9 that the supervisor answers
   with a start): their consumers held positions in logs that no longer exist, and a fresh
   start joins the new, empty groups from the earliest offset, so nothing published from here on
   is skipped;
3. ingest replays its archive by received_at from the start of the lost broker's life, and every
   other service republishes its outbox from then (both clamped to what they still keep: a 422
   names the earliest allowed, which is used instead). The consumers' inboxes drop what they had
   applied already, so the repeats change nothing.

What is not recovered: anything the platform did not write itself (messages produced straight
onto a topic by someone else, and the DLQ topic's records of the lost broker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from crm_common.kafka import ensure_topics

# Reach a little further back than the lost broker's start: the services' clocks stamp rows, ours the start.
MARGIN = timedelta(seconds=60)

Partition = tuple[str, int]


async def read_log_ends(bootstrap: str, topics: Sequence[str]) -> tuple[list[str], dict[Partition, int]]:
    """The platform topics the broker does not list, and the log end offset of each partition of the others.

    Reads the metadata of all topics (a metadata request naming a topic could create it).
    """
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, request_timeout_ms=10_000
    )
    try:
        await client.start()
        listed = await client.topics()
        missing = sorted(t for t in topics if t not in listed)
        tps = [
            TopicPartition(t, p) for t in topics if t in listed for p in sorted(client.partitions_for_topic(t) or ())
        ]
        ends = await client.end_offsets(tps) if tps else {}
    finally:
        await client.stop()
    return missing, {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}


def loss_reason(recorded: Mapping[Partition, int], missing: Sequence[str], ends: Mapping[Partition, int]) -> str | None:
    """Why the broker's state shows it lost data compared with what was `recorded`; None when it did not."""
    if missing:
        return f"topics missing: {', '.join(missing)}"
    behind = [(p, ends.get(p, 0), end) for p, end in sorted(recorded.items()) if ends.get(p, 0) < end]
    if behind:
        (topic, partition), now, was = behind[0]
        return f"{len(behind)} partitions end below what they held (e.g. {topic}[{partition}] at {now}, was {was})"
    return None


@dataclass
class Recovered:
    """What a recovery did, for the log and the tests."""

    reason: str
    since: datetime
    replayed: int = 0
    republished: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class BrokerRecovery:
    """Detect that a restarted broker came back empty and restore the platform's messages (see the module)."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: Sequence[str],
        partitions: int,
        ingest_url: str | None,
        ingest_key: str | None,
        outbox_urls: Mapping[str, str],
        ops_key: str | None,
        restart_services: Callable[[], Awaitable[None]],
        say: Callable[[str], None],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.partitions = partitions
        self.ingest_url = ingest_url
        self.ingest_key = ingest_key
        self.outbox_urls = dict(outbox_urls)
        self.ops_key = ops_key
        self.restart_services = restart_services
        self.say = say
        self.now = now
        # The log end offsets last seen while the broker was up, and when the running broker started.
        self.recorded: dict[Partition, int] = {}
        self.broker_since = now()
        self.recoveries: list[Recovered] = []

    async def observe(self) -> None:
        """Record the log end offsets (while the broker is up and has the topics; an error keeps the last)."""
        missing, ends = await read_log_ends(self.bootstrap, self.topics)
        if not missing:
            self.recorded = {p: max(end, self.recorded.get(p, 0)) for p, end in ends.items()}

    async def after_restart(self) -> Recovered | None:
        """Call once the restarted broker listens: recover when it lost data, else say so; what was done."""
        restarted_at = self.now()
        missing, ends = await read_log_ends(self.bootstrap, self.topics)
        reason = loss_reason(self.recorded, missing, ends)
        if reason is None:
            self.say("broker restarted with its data: nothing to recover")
        else:
            # From the start of the lost broker's life: a failed recovery, tried again, reaches as far.
            done = await self.recover(reason, self.broker_since - MARGIN)
            self.recoveries.append(done)
        self.broker_since = restarted_at
        return None if reason is None else self.recoveries[-1]

    async def recover(self, reason: str, since: datetime) -> Recovered:
        """Recreate the topics, restart the services, replay ingest's archive and republish the outboxes from `since`."""
        self.say(f"broker lost its data ({reason}); recovering everything published since {since.isoformat()}")
        done = Recovered(reason=reason, since=since)
        await ensure_topics(self.bootstrap, self.topics, partitions=self.partitions)
        self.say("topics recreated; restarting the services so their consumers start from the new logs")
        await self.restart_services()
        async with httpx.AsyncClient(timeout=60) as http:
            if self.ingest_url is not None:
                done.replayed = await self._post_until_done(
                    http,
                    f"{self.ingest_url}/v1/replay",
                    self.ingest_key,
                    {"from": since, "to": self.now() + timedelta(days=1), "by": "received_at"},
                    field="from",
                    done=done,
                )
            for service, url in self.outbox_urls.items():
                done.republished[service] = await self._post_until_done(
                    http, f"{url}/v1/ops/republish", self.ops_key, {"since": since}, field="since", done=done
                )
        self.recorded = {}
        self.say(
            f"recovered: ingest replayed {done.replayed} events; republished "
            + ", ".join(f"{s} {n}" for s, n in done.republished.items())
            + (f" ({'; '.join(done.notes)})" if done.notes else "")
        )
        return done

    async def _post_until_done(
        self,
        http: httpx.AsyncClient,
        url: str,
        key: str | None,
        body: dict[str, Any],
        *,
        field: str,
        done: Recovered,
        attempts: int = 120,
    ) -> int:
        """POST `body` until it is answered 2xx (a restarting service is retried); a 422 about `field`
        reaching too far back is sent again from the earliest allowed. Answers the count it reports."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for _ in range(attempts):
            payload = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in body.items()}
            try:
                r = await http.post(url, json=payload, headers=headers)
            except httpx.HTTPError:
                await asyncio.sleep(1)
                continue
            if r.status_code < 300:
                data = r.json()
                return int(data.get("replayed", data.get("republished", 0)))
            earliest = _earliest(r, field)
            if earliest is not None:
                done.notes.append(f"{url} reaches back only to {earliest.isoformat()}")
                body = {**body, field: earliest + timedelta(seconds=5)}
                continue
            if r.status_code == 404:
                done.notes.append(f"{url} answered 404 (no outbox retention there): nothing resent")
                return 0
            if r.status_code < 500 and r.status_code != 429:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
            await asyncio.sleep(1)
        raise RuntimeError(f"{url} did not accept the recovery within {attempts} attempts")


def _earliest(r: httpx.Response, field: str) -> datetime | None:
    """The `earliest` a 422 about `field` names, if it is one."""
    if r.status_code != 422:
        return None
    try:
        details = r.json()["error"]["details"] or []
        for d in details:
            if d.get("loc", [None])[-1] == field and d.get("earliest"):
                return datetime.fromisoformat(d["earliest"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


class BrokerWatch:
    """Drive a `BrokerRecovery` from the supervisor that runs the broker as its child `name`.

    While the same broker process runs, it records the log end offsets every `observe_every_s`;
    when the supervisor has started a new one (a new pid) and its port is open, it calls
    `after_restart` (which detects whether anything was lost before recovering).
    """

    def __init__(
        self,
        recovery: BrokerRecovery,
        *,
        pid: Callable[[], int | None],
        port: int,
        observe_every_s: float = 5.0,
    ) -> None:
        self.recovery = recovery
        self.pid = pid
        self.port = port
        self.observe_every_s = observe_every_s
        self.seen_pid = pid()

    async def run(self, stopping: asyncio.Event) -> None:
        """Watch until `stopping` is set; a failed recovery is said and tried again at the next pass."""
        from crm_common.infra import port_open

        last_observe = 0.0
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            pid = self.pid()
            try:
                if pid is not None and pid != self.seen_pid and port_open("127.0.0.1", self.port):
                    await self.recovery.after_restart()
                    self.seen_pid = pid
                elif pid is not None and pid == self.seen_pid and loop.time() - last_observe >= self.observe_every_s:
                    last_observe = loop.time()
                    await asyncio.wait_for(self.recovery.observe(), 20)
            except Exception as exc:
                self.recovery.say(f"broker watch: {exc!r}")
            try:
                await asyncio.wait_for(stopping.wait(), 0.5)
            except TimeoutError:
                pass
