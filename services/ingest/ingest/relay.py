"""The relay of the archive: publishes queued events to crm.events.v1 in archive order."""

from __future__ import annotations

from crm_common.outbox import OutboxRelay
from crm_common.settings import TOPIC_EVENTS


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
