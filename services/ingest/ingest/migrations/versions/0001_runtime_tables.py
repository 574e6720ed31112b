"""inbox and outbox tables of the runtime

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from crm_common.migrations import create_runtime_tables, drop_runtime_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_runtime_tables()


def downgrade() -> None:
    drop_runtime_tables()
