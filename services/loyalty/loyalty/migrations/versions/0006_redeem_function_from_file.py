"""loyalty_redeem() from its versioned file loyalty/sql/loyalty_redeem.sql, which now also wakes the relay

The function's definition lives in `loyalty/sql/loyalty_redeem.sql` (package data), its one home, which this
migration applies with CREATE OR REPLACE. What changed against 0003: the ledger entry names `debt_change` (0, its
default), and the function notifies `crm_outbox` after writing its outbox row, so the relay publishes it at
once instead of at its next poll.

0003 reads a frozen copy of its own text (`loyalty_redeem_0003.sql`) rather than the current file: a migration
must create what it created when it first ran, and the outbox insert stays out of Python. A later edit of
`loyalty_redeem.sql` needs a new migration that applies it again, as this one does: databases migrated past
0006 do not read it again.
"""

from importlib import resources

from alembic import op

revision = "0006"
down_revision = "0005"


def _apply(name: str) -> None:
    op.execute((resources.files("loyalty") / "sql" / name).read_text(encoding="utf-8"))


def upgrade() -> None:
    _apply("loyalty_redeem.sql")


def downgrade() -> None:
    _apply("loyalty_redeem_0003.sql")
