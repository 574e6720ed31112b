"""Prometheus metrics shared by the runtime; defined once per process, labelled by name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMER_MESSAGES = Counter("crm_consumer_messages_total", "Messages handled by a consumer", ["consumer", "outcome"])
CONSUMER_RETRIES = Counter(
    "crm_consumer_batch_retries_total", "Batches rewound after a transient failure", ["consumer"]
)
CONSUMER_BATCH_SECONDS = Histogram("crm_consumer_batch_seconds", "Time to apply one batch", ["consumer"])
# The group's lag, whichever member holds the partition (or none, during a rebalance): log end
# minus the group's committed offset, from the log start where the group never committed.
CONSUMER_LAG = Gauge(
    "crm_consumer_lag",
    "Messages of the partition not yet committed by the consumer group (log end minus committed offset)",
    ["consumer", "topic", "partition"],
)
CONSUMER_PARTITIONS = Gauge(
    "crm_consumer_assigned_partitions", "Partitions this member holds (0 while it rebalances)", ["consumer"]
)
OUTBOX_PUBLISHED = Counter("crm_outbox_published_total", "Messages published by an outbox relay", ["relay"])
OUTBOX_BACKLOG = Gauge("crm_outbox_backlog", "Messages waiting in an outbox after the last relay pass", ["relay"])
HTTP_REQUESTS = Counter("crm_http_requests_total", "HTTP requests", ["service", "method", "status"])
HTTP_SECONDS = Histogram(
    "crm_http_request_seconds",
    "HTTP request latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WORKER_PASSES = Counter("crm_worker_passes_total", "Passes of a background worker", ["worker", "outcome"])
WORKER_ITEMS = Counter("crm_worker_items_total", "Items a background worker handled", ["worker"])
WORKER_SECONDS = Histogram("crm_worker_pass_seconds", "Time of one background worker pass", ["worker"])
WAKEUPS = Counter("crm_notify_wakeups_total", "PostgreSQL notifications that woke workers", ["channel"])
