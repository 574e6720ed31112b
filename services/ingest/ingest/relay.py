"""The relay of the archive: publishes queued events to crm.events.v1 in archive order."""

from __future__ import annotations

import asyncio
from typing import Any

from crm_common.outbox import OutboxRelay
from crm_common.settings import TOPIC_EVENTS


class TopicMissing(RuntimeError):
    """The broker does not list the events topic (yet)."""


class EventRelay(OutboxRelay):
    """The common outbox relay reading the event archive's publish queue instead of `outbox`.

    Keyed by customer_id (or `anon:<anonymous_id>`); the value is the stored EventMessage, whose
    `id` is `<source>:<event_id>`, so a replay or a crash between send and ack is deduplicated
    downstream.
    """

    fetch_sql = (
        f"SELECT p.seq, '{TOPIC_EVENTS}' AS topic, e.customer_key, e.message "
        "FROM event_pending p JOIN events e ON e.seq = p.seq ORDER BY p.seq LIMIT :limit"
    )
    ack_sql = "DELETE FROM event_pending WHERE seq = ANY(CAST(:ids AS bigint[]))"
    backlog_sql = "SELECT count(*) FROM event_pending"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # True at start and after a failed pass, until a pass succeeds.
        self.failing = True

    async def run_once(self) -> int:
        # After a failure (and at start) check that the broker lists the topic before sending:
        # a broker that came back empty would otherwise auto-create it on the first send (the
        # embedded one acknowledges such sends and loses them), instead of waiting for the
        # topics to be created with their proper partitions.
        if self.failing:
            await self._require_topic()
        try:
            sent = await super().run_once()
        except Exception:
            self.failing = True
            raise
        self.failing = False
        return sent

    async def _require_topic(self) -> None:
        topic = self.topic_prefix + TOPIC_EVENTS
        metadata = await asyncio.wait_for(self.producer.client.fetch_all_metadata(), self.send_timeout_s)
        if topic not in metadata.topics():
            raise TopicMissing(f"topic {topic} does not exist on the broker")
