"""points debt: a reversal larger than the spendable points is owed, not forgotten

A refund reverses the points its purchase accrued. When some of them were spent already, the balance cannot go
below zero, and the part that could not be taken used to be dropped: the customer kept points never earned.
Now that part is the account's `points_debt`, netted against the next credits before they become spendable.

The ledger records debt movements too: `debt_change` is the change of the account's debt by an entry (+ for the
shortfall of a reversal, - for a debt settlement), so `points_debt` equals the ledger's sum of `debt_change` as
`balance` equals its sum of `points`. A reversal that finds nothing to take moves only the debt, so an entry
must move points or debt (the old CHECK asked for points). Both new columns have a constant default, so adding
them rewrites no rows; checking the new CHECK constraints reads each table once, under the migration's lock
(the whole upgrade runs in one transaction).
"""

from alembic import op

revision = "0005"
down_revision = "0004"


STATEMENTS = [
    """
    ALTER TABLE accounts ADD COLUMN points_debt numeric(20,2) NOT NULL DEFAULT 0
        CONSTRAINT ck_accounts_points_debt_not_negative CHECK (points_debt >= 0)
    """,
    """
    ALTER TABLE ledger ADD COLUMN debt_change numeric(20,2) NOT NULL DEFAULT 0
    """,
    """
    ALTER TABLE ledger ADD CONSTRAINT ck_ledger_moves_points_or_debt CHECK (points <> 0 OR debt_change <> 0)
    """,
    """
    ALTER TABLE ledger DROP CONSTRAINT ck_ledger_points_not_zero
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    # Entries that moved only debt cannot satisfy the old CHECK; they would have to go, and the ledger is
    # append-only (its trigger refuses DELETE). Downgrading is possible only while there are none.
    op.execute("ALTER TABLE ledger ADD CONSTRAINT ck_ledger_points_not_zero CHECK (points <> 0)")
    op.execute("ALTER TABLE ledger DROP CONSTRAINT ck_ledger_moves_points_or_debt")
    op.execute("ALTER TABLE ledger DROP COLUMN debt_change")
    op.execute("ALTER TABLE accounts DROP COLUMN points_debt")
