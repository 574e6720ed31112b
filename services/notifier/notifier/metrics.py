"""Prometheus metrics of the notifier (served on /metrics with the runtime's)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "crm_notifier_messages_total", "Messages handled by the dispatcher, by resulting state", ["channel", "state"]
)
PROVIDER_CALLS = Counter("crm_notifier_provider_calls_total", "Provider calls by outcome", ["provider", "outcome"])
PROVIDER_SECONDS = Histogram(
    "crm_notifier_provider_seconds",
    "Time of one provider send, retries included",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SMS_COST = Counter("crm_notifier_sms_cost_total", "Cost of SMS sent, in the account currency", ["provider"])
