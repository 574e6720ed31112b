"""spend_months: each customer's spend per UTC month, kept by accrual, so the tier's window spend is not re-summed

The 12-month spend that decides the tier was the sum of `paid - refunded` over every purchase in the window,
read again for every buyer of every batch: its cost grew with each customer's history. Accrual now adds each
purchase's paid amount (and subtracts each refund) to its month here, in the transaction that writes the
purchase. The window's spend is then the months after the one the window starts in, plus the purchases of that
first, partial month, read through the new (customer_id, occurred_at) index: the same figure, exactly.
"""

from alembic import op

revision = "0004"
down_revision = "0003"


STATEMENTS = [
    """
    CREATE TABLE spend_months (
        customer_id text NOT NULL,
        month date NOT NULL,
        spend numeric(20,4) NOT NULL,
        CONSTRAINT pk_spend_months PRIMARY KEY (customer_id, month)
    )
    """,
    """
    INSERT INTO spend_months (customer_id, month, spend)
    SELECT customer_id, CAST(date_trunc('month', occurred_at AT TIME ZONE 'UTC') AS date), sum(paid - refunded)
    FROM purchases GROUP BY 1, 2
    """,
    """
    CREATE INDEX ix_purchases_customer_occurred ON purchases (customer_id, occurred_at)
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX ix_purchases_customer_occurred")
    op.execute("DROP TABLE spend_months")
