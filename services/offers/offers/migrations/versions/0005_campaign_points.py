"""bonus points loyalty awarded for campaigns, and each customer's loyalty balance and tier (from crm.loyalty.v1)

`campaign_points`: one row per crm.loyalty.v1 event that names a campaign (`data.campaign_id`): a points-multiplier
offer's extra points (positive) or their reversal by a refund (negative), with their money value. The campaign
report reads it for the campaign's cost. `customer_loyalty`: the latest balance and tier loyalty published for a
customer, personalisation's `points_balance` and `loyalty_tier`. Two new tables: nothing existing is rewritten.
"""

from alembic import op

revision = "0005"
down_revision = "0004"


STATEMENTS = [
    """
    CREATE TABLE campaign_points (
        event_id text NOT NULL,
        campaign_id text NOT NULL,
        offer_id text,
        customer_id text NOT NULL,
        points numeric(20,2) NOT NULL,
        value numeric(20,4),
        occurred_at timestamptz NOT NULL,
        CONSTRAINT pk_campaign_points PRIMARY KEY (event_id)
    )
    """,
    "CREATE INDEX ix_campaign_points_campaign_id ON campaign_points (campaign_id)",
    """
    CREATE TABLE customer_loyalty (
        customer_id text NOT NULL,
        points_balance numeric(20,2),
        balance_at timestamptz,
        loyalty_tier text,
        tier_at timestamptz,
        CONSTRAINT pk_customer_loyalty PRIMARY KEY (customer_id)
    )
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE customer_loyalty")
    op.execute("DROP TABLE campaign_points")
