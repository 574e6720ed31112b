"""loyalty_redeem() from its versioned file loyalty/sql/loyalty_redeem.sql, which now also wakes the relay

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

The function's definition moves out of migration text into `loyalty/sql/loyalty_redeem.sql` (package data), its
one home, which this migration applies with CREATE OR REPLACE. What changed against 0003: the ledger entry names
`debt_change` (0, as its default), and the function notifies `crm_outbox` after writing its outbox row, so the
relay publishes it at once instead of at its next poll.

0003 keeps its historical text: it is what databases migrated to 0003 got, and a migration's meaning must not
change after it ran. A later edit of the file needs a new migration that applies it again, as this one does.
"""

from importlib import resources

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute((resources.files("loyalty") / "sql" / "loyalty_redeem.sql").read_text(encoding="utf-8"))


def downgrade() -> None:
    # 0003's version differs only in not notifying the relay (which then publishes at its next poll) and in
    # leaving debt_change to its default: the same rows. Keeping the newer body is harmless.
    pass
