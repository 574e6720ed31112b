"""Revision 0001: the inbox and outbox tables of the runtime (crm_common.migrations)."""

from crm_common.migrations import create_runtime_tables, drop_runtime_tables

revision, down_revision = "0001", None
upgrade, downgrade = create_runtime_tables, drop_runtime_tables
