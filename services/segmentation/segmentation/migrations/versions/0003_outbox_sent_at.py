"""Revision 0003: sent outbox rows are kept for a window (`sent_at`, crm_common.migrations.add_outbox_sent_at)."""

from crm_common.migrations import add_outbox_sent_at, drop_outbox_sent_at

revision, down_revision = "0003", "0002"
upgrade, downgrade = add_outbox_sent_at, drop_outbox_sent_at
