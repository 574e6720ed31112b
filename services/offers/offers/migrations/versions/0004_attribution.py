"""purchases and refunds offers consumed, for attributing revenue to campaigns"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 4)


def upgrade() -> None:
    # One row per order: the paid total as the purchase event said it. An order posted twice (a second
    # event id for the same order) is kept once.
    op.create_table(
        "purchases",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("revenue", MONEY, nullable=False),
        sa.Column("properties", JSONB(), nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_purchases"),
        sa.UniqueConstraint("customer_id", "order_id", name="uq_purchases_order"),
    )
    op.create_index("ix_purchases_customer_id_occurred_at", "purchases", ["customer_id", "occurred_at"])
    op.create_index("ix_purchases_occurred_at", "purchases", ["occurred_at"])
    # Refunds reduce their order's revenue (at the order's time, whenever they arrive).
    op.create_table(
        "refunds",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_refunds"),
    )
    op.create_index("ix_refunds_customer_id_order_id", "refunds", ["customer_id", "order_id"])
    # attribution_days was bounded 1-365 (default 14) before the report used it; it is 1-90 now.
    # Definitions saved above 90 would no longer load: they keep the longest window allowed.
    for table in ("campaigns", "campaign_versions"):
        op.execute(
            f"UPDATE {table} SET definition = jsonb_set(definition, '{{attribution_days}}', '90') "
            "WHERE jsonb_typeof(definition -> 'attribution_days') = 'number' "
            "AND CAST(definition ->> 'attribution_days' AS numeric) > 90"
        )


def downgrade() -> None:
    op.drop_table("refunds")
    op.drop_table("purchases")
