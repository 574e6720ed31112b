"""point_offers: the bonus-points multipliers that offers' campaigns promised a customer

Offers requests a `points_multiplier` message on crm.messages.v1 (campaign_id, offer_id, variables.multiplier,
variables.valid_until); loyalty consumes those requests and keeps one row per message here. Accrual multiplies
the base points of the customer's first purchase within its validity and records which order used it; a refund
reverses the bonus with the purchase (`points_reversed`). A new table: nothing existing is rewritten.
"""

from alembic import op

revision = "0007"
down_revision = "0006"


STATEMENTS = [
    """
    CREATE TABLE point_offers (
        message_id text NOT NULL,
        customer_id text NOT NULL,
        campaign_id text NOT NULL,
        offer_id text NOT NULL,
        multiplier numeric(8,4) NOT NULL,
        requested_at timestamptz NOT NULL,
        valid_until timestamptz NOT NULL,
        order_id text,
        points numeric(20,2) NOT NULL DEFAULT 0,
        points_reversed numeric(20,2) NOT NULL DEFAULT 0,
        used_at timestamptz,
        CONSTRAINT pk_point_offers PRIMARY KEY (message_id)
    )
    """,
    "CREATE INDEX ix_point_offers_open ON point_offers (customer_id, valid_until) WHERE order_id IS NULL",
    "CREATE UNIQUE INDEX uq_point_offers_order ON point_offers (customer_id, order_id) WHERE order_id IS NOT NULL",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE point_offers")
